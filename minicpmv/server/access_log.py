"""One access-log line per HTTP request (id, method, path, status, prompt/completion tokens,
time to first token, duration), and the log formats the server writes: text or JSON lines.

The chat route leaves its Completion in the request state (`request.state.completion`); the
middleware reads the token counts and the first-token time from it once the response, streamed
or not, has been sent."""
from __future__ import annotations

import json
import logging
import time
import uuid

access_log = logging.getLogger("minicpmv.access")


class AccessLogMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            access_log.info("", extra={"access": access_fields(scope, status["code"], start)})


def access_fields(scope, status: int, start: float) -> dict:
    completion = scope.get("state", {}).get("completion")
    fields = {"id": getattr(completion, "id", None) or f"req-{uuid.uuid4().hex[:12]}",
              "method": scope.get("method"), "path": scope.get("path"), "status": status,
              "client": (scope.get("client") or ("-",))[0]}
    if completion is not None:
        usage = completion.usage()
        handle = completion.handle
        fields.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                      ttft_ms=None if handle.first_token_at is None else
                      round((handle.first_token_at - handle.arrival) * 1000, 1))
    fields["duration_ms"] = round((time.monotonic() - start) * 1000, 1)
    return fields


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if access is not None:
            record.msg, record.args = " ".join(f"{k}={'-' if v is None else v}" for k, v in access.items()), ()
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the access fields if any."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "logger": record.name}
        access = getattr(record, "access", None)
        if access is not None:
            out.update(access)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    """Root handler on stderr in the chosen format; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)  # e.g. a 4.0/4.5 prompt cut to max_inp_length, in the chosen format
    access_log.setLevel(logging.INFO)  # one line per request unless --log-level is above info
    if logging.getLevelName(level.upper()) > logging.INFO:
        access_log.setLevel(logging.getLevelName(level.upper()))
