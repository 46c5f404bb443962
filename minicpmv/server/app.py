"""The HTTP surface (Starlette): POST /v1/chat/completions, GET /v1/models, /health, /metrics,
and the web chat page at / (web.py).

A request walks: API key -> content type (415) -> body, read under the size limit (413) -> JSON
(nesting bounded) -> pydantic validation -> model name, max_tokens and media counts -> admission
(429 when full) -> job building on the prepare pool (media sizes against the pixel budgets, template,
tokens) -> the engine thread -> decoded choices -> SSE or one JSON object. Every client mistake is a
4xx with a message that names it, before the work it would waste; the routes never touch a tensor.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..cpu.openmp import confine_thread
from .access_log import AccessLogMiddleware
from .completions import Completion
from .config import ServeConfig
from .constrained import GrammarFactory
from .errors import ApiError, bad_request, validation_error
from .jobs import build_job
from .media_limits import PixelBudget
from .media_policy import MediaPolicy
from .metrics import Metrics
from .protocol import ChatCompletionRequest, ModelCard, ModelList, completion_id
from .web import web_routes
from .worker import Worker

log = logging.getLogger("minicpmv.server")
MAX_JSON_DEPTH = 64  # arrays/objects inside one another; real requests (tool schemas included) stay far below


class Server:
    def __init__(self, model, config: ServeConfig, engine_thread: bool = True):
        self.model, self.config = model, config
        self.metrics = Metrics()
        model.engine.encoder_cache.max_bytes = config.encoder_cache_bytes
        self.worker = Worker(model, self.metrics, config.max_concurrency, config.max_queue, own_thread=engine_thread)
        self.policy = MediaPolicy(config.allow_url_fetch, config.allowed_local_media_path, config.media_max_bytes,
                                  config.media_fetch_timeout_s)
        self.pixels = PixelBudget(config.media_limits.max_inflight_pixels)
        self.grammars = _grammar_factory(model)
        # confined: a torch op on one of these threads would give it an OpenMP team of its own, and two
        # teams on few cores slow every engine step (cpu/openmp.py)
        self.pool = ThreadPoolExecutor(config.prepare_threads, thread_name_prefix="minicpmv-prepare",
                                       initializer=confine_thread)
        self.started = int(time.time())

    # -- routes -----------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        self._authorize(request)
        chat = await self._parse(request)
        self.worker.admit(chat.n)  # 429 / 503 when there is no room
        release, pixels = True, 0
        try:
            job = await asyncio.get_running_loop().run_in_executor(self.pool, self._build, chat)
            pixels = job.pixels
            handle = self.worker.submit(job, arrival)
            completion = Completion(self.worker, handle, job, chat, completion_id(), chat.model)
            request.state.completion = completion  # for the access log
            if chat.stream:
                release = False  # the stream releases its slots when it ends
                # the background task covers a client that leaves before the stream's first chunk
                return StreamingResponse(self._stream(completion), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"},
                                         background=BackgroundTask(self._end_stream, completion, "cancelled"))
            return await self._collect(request, completion)
        except ValueError as e:  # InputError and friends: bad media, too long a prompt, bad option
            raise bad_request(str(e)) from e
        finally:
            if release:
                self.worker.release(chat.n)
                self.pixels.release(pixels)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        cards = [ModelCard(id=name, created=self.started, max_model_len=self.model.max_context)
                 for name in self.config.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def health(self, request: Request) -> Response:
        if not self.worker.alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: Request) -> Response:
        e = self.worker.snapshot()
        gauges = {
            "minicpmv_sequences_running": ("Sequences in the engine's running batch", e["running"]),
            "minicpmv_sequences_waiting": ("Sequences in the engine waiting for memory or a batch place", e["waiting"]),
            "minicpmv_kv_blocks_capacity": ("KV-cache blocks in the state pool", e["kv_blocks_total"]),
            "minicpmv_kv_blocks_free": ("KV-cache blocks free", e["kv_blocks_free"]),
            "minicpmv_state_slots_free": ("Recurrent-state slots free", e["state_slots_free"]),
            "minicpmv_prefix_cache_entries": ("Prefix snapshots kept for reuse", e["prefix_entries"]),
            "minicpmv_queue_depth": ("Sequences admitted but not yet running (preparing or waiting)",
                                     self.worker.queue_depth()),
            "minicpmv_sequences_admitted": ("Sequences admitted and not finished", self.worker.admitted),
            "minicpmv_max_concurrency": ("Most sequences decoded together", self.config.max_concurrency),
            "minicpmv_max_queue": ("Most sequences waiting beyond max_concurrency", self.config.max_queue),
            "minicpmv_encoder_cache_bytes": ("Bytes held by the vision-encoding cache", e["encoder_cache_bytes"]),
        }
        counters = {  # only ever grow: typed as counters, named *_total
            "minicpmv_prefix_cache_hits_total": ("Requests that reused a cached prefix", e["prefix_hits"]),
            "minicpmv_prefix_cache_hit_tokens_total": ("Prompt tokens served from the prefix cache",
                                                       e["prefix_hit_tokens"]),
            "minicpmv_preemptions_total": ("Sequences preempted for memory and recomputed later", e["preemptions"]),
            "minicpmv_failed_sequences_total": ("Sequences ended by an error inside the engine", e["failed"]),
            "minicpmv_encoder_cache_hits_total": ("Vision encodings served from the cache", e["encoder_cache_hits"]),
            "minicpmv_encoder_cache_misses_total": ("Vision encodings computed", e["encoder_cache_misses"]),
        }
        return PlainTextResponse(self.metrics.render(gauges, counters), media_type="text/plain; version=0.0.4")

    # -- helpers ------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>' with the key the "
                                "server was started with (--api-key)", code="invalid_api_key")

    async def _parse(self, request: Request) -> ChatCompletionRequest:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                                f"(got {media_type or 'no content type'!r})", code="unsupported_media_type")
        payload = _load_json(await self._body(request))
        try:
            chat = ChatCompletionRequest.model_validate(payload)
        except ValidationError as e:
            raise validation_error(e) from e
        if chat.model not in self.config.served_model_names:
            raise ApiError(404, f"model {chat.model!r} does not exist on this server; it serves "
                                f"{', '.join(map(repr, self.config.served_model_names))}", param="model",
                           code="model_not_found")
        wanted, context = chat.max_new_tokens, self.model.max_context
        if wanted is not None and wanted > context:
            field = "max_completion_tokens" if chat.max_completion_tokens is not None else "max_tokens"
            raise bad_request(f"{field} is {wanted}, more than the model's context of {context} tokens "
                              f"(prompt included)", param=field)
        try:
            self.config.media_limits.check_counts(chat.messages, chat.media_options().get("max_num_frames"))
        except ValidationError as e:
            raise validation_error(e) from e
        except ValueError as e:
            raise bad_request(str(e), param="max_num_frames" if "max_num_frames" in str(e) else "messages") from e
        if chat.unescape_newlines is None:
            chat.unescape_newlines = self.config.unescape_newlines
        return chat

    async def _body(self, request: Request) -> bytes:
        """The body, read chunk by chunk and refused (413) as soon as it passes the limit, declared or not."""
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is {int(declared)} bytes, over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _build(self, chat: ChatCompletionRequest):
        """On the prepare pool: vet the media, measure it against the pixel budgets, build the job."""
        limits = self.config.media_limits
        messages = self.policy.apply(chat.messages)
        messages, pixels = limits.measure(messages, chat.media_options().get("max_num_frames"),
                                          self.config.media_max_bytes)
        if not self.pixels.acquire(pixels):
            raise ApiError(429, f"server busy: the media of requests in flight fill the budget of "
                                f"{limits.max_inflight_pixels} pixels; retry shortly", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        try:
            job = build_job(self.model, chat, messages, self.grammars, self.config.max_image_pixels)
        except BaseException:
            self.pixels.release(pixels)
            raise
        job.pixels = pixels
        return job

    async def _collect(self, request: Request, completion: Completion) -> Response:
        result = asyncio.ensure_future(completion.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            abandoned = not result.done()  # the client left (or we are shutting down)
            if abandoned:
                result.cancel()
            self.worker.cancel(completion.handle)  # no-op when every choice finished
        if abandoned:
            self.metrics.request_done("cancelled")
            return Response(status_code=499)
        reply = result.result()  # raises an engine error
        self.metrics.request_done("ok")
        return JSONResponse(reply.model_dump())

    async def _stream(self, completion: Completion):
        outcome = "cancelled"
        try:
            async for chunk in completion.sse():
                yield chunk
            outcome = "ok"
        except (ApiError, ValueError) as e:  # failed after the stream began: say so in the stream
            outcome = "error"
            error = e if isinstance(e, ApiError) else bad_request(str(e))
            yield f"data: {json.dumps(error.body())}\n\n"
        except Exception:
            outcome = "error"
            log.exception("stream failed")
            raise
        finally:
            self._end_stream(completion, outcome)

    def _end_stream(self, completion: Completion, outcome: str) -> None:
        """Once per stream, however it ended: free its sequences and its admission slots."""
        if completion.ended:
            return
        completion.ended = True
        self.worker.cancel(completion.handle)  # no-op when every choice finished
        self.worker.release(completion.request.n)
        self.pixels.release(completion.job.pixels)
        self.metrics.request_done(outcome)

    def shutdown(self) -> None:
        self.worker.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _load_json(body: bytes):
    try:
        payload = json.loads(body, parse_constant=_no_constant)
    except RecursionError as e:
        raise bad_request(f"request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}") from e
    except ValueError as e:  # NaN / Infinity
        raise bad_request(f"request body is not valid JSON: {e}") from e
    if not isinstance(payload, dict):
        raise bad_request(f"request body must be a JSON object, got {_json_kind(payload)}")
    if _depth(payload) > MAX_JSON_DEPTH:
        raise bad_request(f"request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
    return payload


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _json_kind(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _grammar_factory(model) -> GrammarFactory | None:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return None
    factory = GrammarFactory(model.tokenizer, model.family.stop_token_ids)
    # Built now, before the server listens: llguidance holds the GIL for the whole vocabulary scan
    # (seconds), which would freeze the event loop and the engine if it ran later.
    factory.warm_up()
    return factory


def create_app(model, config: ServeConfig, engine_thread: bool = True) -> Starlette:
    """The ASGI app. With `engine_thread=False` the caller runs the engine loop itself
    (`app.state.server.worker.run_here()`, as `minicpmv serve` does on its main thread)."""
    server = Server(model, config, engine_thread)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.worker.start(asyncio.get_running_loop())
        yield
        server.shutdown()

    async def api_error(request: Request, exc: ApiError) -> Response:
        server.metrics.request_done("error" if exc.status >= 500 else "rejected")
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            message = f"there is no {request.url.path} on this server (it serves /v1/chat/completions, /v1/models)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            if exc.headers and exc.headers.get("Allow"):
                message += f" (use {exc.headers['Allow']})"
        else:
            message = f"{request.method} {request.url.path}: {exc.detail}"
        return ApiError(exc.status_code, message, headers=exc.headers).response()

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error in %s", request.url.path)
        server.metrics.request_done("error")
        return ApiError(500, "internal server error; the server log has the details").response()

    routes = [Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.prometheus, methods=["GET"])]
    if config.web_chat:
        routes += web_routes()
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(AccessLogMiddleware)],
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error})
    app.state.server = server
    return app

