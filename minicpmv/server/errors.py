"""HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, which the
official clients turn into BadRequestError, AuthenticationError, NotFoundError, RateLimitError...
Messages are plain sentences: no Python reprs, no library prefixes."""
from __future__ import annotations

import re

from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}
_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def plain(message: str) -> str:
    """A message without Python object reprs (`<_io.BytesIO object at 0x...>` -> "the data")."""
    return _REPR.sub("the data", message)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, plain(message), param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def validation_error(error) -> ApiError:
    """pydantic's ValidationError as a 400: one `field.path: message` per problem; `param` names the first field."""
    lines, params = [], []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "body"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        if e["type"] == "finite_number":
            msg = "must be a finite number"
        lines.append(f"{where}: {msg}")
        params.append(where if e["loc"] else _field_in(msg))
    return bad_request("; ".join(lines), param=params[0] if params else None)


def _field_in(message: str) -> str | None:
    """The field a model-level check names first ('seed + n - 1 must...' -> 'seed')."""
    match = re.match(r"'?([a-z_]+)'?", message)
    return match.group(1) if match else None
