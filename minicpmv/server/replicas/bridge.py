"""Run one HTTP request through an ASGI app in this process and stream the response out, so a
Ray Serve replica can host the unchanged Starlette app behind a deployment method. The request
body arrives whole; the response comes back as ("start", status, headers) then body chunks.
Closing the stream early (the client left) tells the app the client disconnected, which aborts
the request's sequences as it does for a direct HTTP client."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


async def call_asgi(app, method: str, path: str, query: str, headers: list[tuple[str, str]],
                    body: bytes) -> AsyncIterator[tuple | bytes]:
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(messages.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the app returned (or failed) without sending more
                getter.cancel()
                if messages.empty():
                    task.result()  # raises the app's error
                    return
                message = messages.get_nowait()
            else:
                message = getter.result()
            if message["type"] == "http.response.start":
                yield ("start", message["status"],
                       [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=30)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()
        except Exception:  # noqa: BLE001 - already reported through the stream or by the app's own handlers
            pass
