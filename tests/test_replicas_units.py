"""The Ray-free parts of `serve --replicas`: the affinity key (conversations stick, others
spread), rendezvous ranking, and the in-process ASGI bridge that carries our app inside a
replica (streaming, and a client that leaves is a disconnect the app sees)."""
import asyncio
import json

from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from minicpmv.server.replicas.affinity import affinity_key, rank
from minicpmv.server.replicas.bridge import call_asgi


def body(messages, **extra) -> bytes:
    return json.dumps({"model": "m", "messages": messages, **extra}).encode()


def test_every_turn_of_a_conversation_has_the_key_of_its_opening():
    system = {"role": "system", "content": "Be brief."}
    first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                         {"type": "text", "text": "What is this?"}]}
    turns = [[system, first],
             [system, first, {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"}],
             [system, first, {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"},
              {"role": "assistant", "content": "Grey."}, {"role": "user", "content": "Sure?"}]]
    keys = {affinity_key({}, body(t)) for t in turns}
    assert len(keys) == 1 and keys.pop().startswith("prefix:")
    other_image = json.loads(json.dumps(first))
    other_image["content"][0]["image_url"]["url"] = "data:image/png;base64,BBBB"
    assert affinity_key({}, body([system, other_image])) != affinity_key({}, body(turns[0]))
    assert affinity_key({}, body([first])) != affinity_key({}, body([system, first]))  # the system prompt counts


def test_an_explicit_session_wins_and_bad_bodies_have_no_key():
    messages = [{"role": "user", "content": "hi"}]
    assert affinity_key({"x-session-id": "abc"}, body(messages)) == "session:abc"
    assert affinity_key({}, body(messages, user="u-7")) == "user:u-7"
    assert affinity_key({}, b"not json") is None
    assert affinity_key({}, b"[1, 2]") is None
    assert affinity_key({}, body([])) is None


def test_rendezvous_ranking_spreads_and_moves_only_the_lost_replicas_keys():
    replicas = ["r1", "r2", "r3"]
    keys = [f"prefix:{i}" for i in range(3000)]
    first = {k: rank(k, replicas)[0] for k in keys}
    shares = [sum(v == r for v in first.values()) / len(keys) for r in replicas]
    assert all(0.28 < s < 0.39 for s in shares), shares
    assert all(sorted(rank(k, replicas)) == replicas for k in keys[:50])
    after = {k: rank(k, ["r1", "r3"])[0] for k in keys}  # r2 died
    assert all(after[k] == first[k] for k in keys if first[k] != "r2")


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_bridge_streams_the_apps_response():
    async def chunks():
        for i in range(3):
            yield f"data: {i}\n\n"

    async def sse(request):
        assert (await request.json()) == {"x": 1} and request.headers["x-test"] == "yes"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def plain(request):
        return JSONResponse({"path": request.url.path, "query": request.url.query}, status_code=201)

    app = Starlette(routes=[Route("/sse", sse, methods=["POST"]), Route("/plain", plain)])

    async def collect(*args):
        return [item async for item in call_asgi(app, *args)]

    items = run(collect("POST", "/sse", "", [("X-Test", "yes"), ("content-type", "application/json")], b'{"x": 1}'))
    start, *parts = items
    assert start[0] == "start" and start[1] == 200 and ("content-type", "text/event-stream; charset=utf-8") in start[2]
    assert b"".join(parts) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    start, *parts = run(collect("GET", "/plain", "a=1", [], b""))
    assert start[1] == 201 and json.loads(b"".join(parts)) == {"path": "/plain", "query": "a=1"}
    start, *parts = run(collect("GET", "/missing", "", [], b""))
    assert start[1] == 404


def test_closing_the_bridge_early_is_a_disconnect_for_the_app():
    seen = []

    async def endless():
        try:
            while True:
                yield "tick\n"
                await asyncio.sleep(0.01)
        finally:
            seen.append("stream closed")

    async def stream(request):
        return StreamingResponse(endless())

    app = Starlette(routes=[Route("/s", stream)])

    async def read_two():
        gen = call_asgi(app, "GET", "/s", "", [], b"")
        got = [await gen.__anext__(), await gen.__anext__()]
        await gen.aclose()  # the client left
        return got

    got = run(read_two())
    assert got[0][0] == "start" and got[1] == b"tick\n"
    assert seen == ["stream closed"]


def test_replica_flags_are_checked_before_anything_starts():
    from cli_support import run_cli

    out = run_cli("serve", "--max-replicas", "3")
    assert out.returncode == 2 and "--max-replicas 3 needs --replicas N" in out.stderr
    out = run_cli("serve", "--replicas", "4", "--max-replicas", "2")
    assert out.returncode == 2 and "--max-replicas 2 needs --replicas N" in out.stderr
    out = run_cli("serve", "--replicas", "-1")
    assert out.returncode == 2 and "--replicas" in out.stderr
    help_text = run_cli("serve", "--help").stdout
    for flag in ("--replicas", "--max-replicas", "--gpus-per-replica", "--no-web-chat", "--unescape-newlines"):
        assert flag in help_text
