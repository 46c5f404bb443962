"""The two Ray Serve deployments behind `minicpmv serve --replicas N`.

* `EngineReplica` (N of them): loads the model and hosts the unchanged Starlette app of
  `minicpmv serve` (create_app), driven request by request through bridge.call_asgi. Serve
  calls `check_health` periodically and restarts a replica whose engine thread died.
* `Front` (the HTTP ingress): reads the request, computes its affinity key (affinity.py) and
  streams the chosen replica's response back, naming the replica in `x-minicpmv-replica`.
  A replica that dies before answering is retried on another one.

Why our app as the ingress and not Ray Serve LLM's OpenAI app: Serve LLM's app is built around
vLLM's engine and its request/response models; plugging this engine in would mean
re-implementing our request handling (video sampling knobs, 4.5 packing, the 4.x reasoning
and tool-call parsers, llguidance constraints, media policy, escaped-newline opt-in, the web
page) inside its interfaces. Running our app per replica keeps all of it by construction.
"""
from __future__ import annotations

import asyncio
import logging

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from .affinity import affinity_key
from .bridge import call_asgi

log = logging.getLogger("minicpmv.replicas")
REPLICA_HEADER = "x-minicpmv-replica"
DROPPED_HEADERS = {"content-length", "transfer-encoding", "connection"}
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class EngineReplica:
    def __init__(self, model: str, load_kwargs: dict, config, threads: int | None = None):
        import torch

        import minicpmv
        from ..app import create_app

        if threads:
            torch.set_num_threads(threads)
        self.app = create_app(minicpmv.load(model, progress=False, **load_kwargs), config)
        self.server = self.app.state.server
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._started = False

    def _start(self) -> None:
        """The engine thread delivers outputs to the event loop that serves requests: this one."""
        if not self._started:
            self.server.worker.start(asyncio.get_running_loop())
            self._started = True

    async def forward(self, method: str, path: str, query: str, headers: list, body: bytes,
                      affinity: str | None = None):
        self._start()
        async for item in call_asgi(self.app, method, path, query, headers, body):
            if isinstance(item, tuple):
                _, status, response_headers = item
                yield {"status": status, "headers": response_headers + [(REPLICA_HEADER, self.replica)]}
            else:
                yield item

    async def check_health(self) -> None:
        self._start()
        if not self.server.worker.alive:
            raise RuntimeError("the engine thread is not running")

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None and self._started:
            server.shutdown()


class Front:
    def __init__(self, engine, attempts: int = 4):
        self.engine = engine.options(stream=True)
        self.attempts = attempts

    async def __call__(self, request: Request):
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"]
        key = affinity_key({k.lower(): v for k, v in headers}, body) \
            if request.url.path == "/v1/chat/completions" else _session(headers)
        args = (request.method, request.url.path, request.url.query, headers, body)
        for attempt in range(self.attempts):
            stream = self.engine.forward.remote(*args, affinity=key)
            try:
                start = await stream.__anext__()
                break
            except RETRYABLE as e:  # the replica died before answering: Serve routes the retry elsewhere
                stream.cancel()
                log.warning("replica unavailable (%s); retrying (%d)", type(e).__name__, attempt + 1)
                await asyncio.sleep(0.5 * (attempt + 1))
        else:
            return JSONResponse({"error": {"message": "no engine replica could take the request; try again",
                                           "type": "service_unavailable", "param": None, "code": None}},
                                status_code=503)
        response_headers = {k: v for k, v in start["headers"] if k.lower() not in DROPPED_HEADERS}
        return StreamingResponse(_body(stream), status_code=start["status"], headers=response_headers)


async def _body(stream):
    try:
        async for chunk in stream:
            yield chunk
    finally:
        stream.cancel()  # the client left: the replica's app sees the disconnect and aborts


def _session(headers: list) -> str | None:
    session = next((v for k, v in headers if k.lower() == "x-session-id"), None)
    return "session:" + session if session else None
