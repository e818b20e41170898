"""Error bodies in the shape of the protocol a path belongs to, naming the offending field.

- OpenAI paths (``/v1/...``): ``{"error": {"message", "type", "param", "code"}}``;
- KServe Open Inference Protocol paths (``/v2/...``): ``{"error": "<param>: <message>"}``, the
  protocol's error object (one string), so KServe and Triton clients parse it.

``install_handlers`` turns every failure into such a body: the server's own ``ApiError``, request
validation (the field named from pydantic's location), unknown paths and methods, and anything
unexpected (500).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse


class ApiError(Exception):
    """A request the server refuses: HTTP ``status``, the message, the offending field (``param``),
    the OpenAI error ``kind``, and extra headers (``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        *,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


V2_PREFIX = "/v2"


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def v2_error_message(message: str, param: str | None) -> str:
    """The Open Inference Protocol error string, always ``"<field>: <what is wrong>"``."""
    if not param or message.startswith(f"{param}: "):
        return message
    if message.startswith(f"{param} "):  # "texts must not be empty" -> "texts: must not be empty"
        message = message[len(param) + 1 :]
    return f"{param}: {message}"


def error_response(
    status: int, message: str, param: str | None, kind: str, headers: dict[str, str] | None = None, *, path: str = ""
) -> JSONResponse:
    body: dict[str, Any]
    if is_v2(path):
        body = {"error": v2_error_message(message, param)}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def loc_to_param(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as the field a client wrote: ``("body", "prompt", 1)`` -> ``prompt[1]``."""
    parts = [p for p in loc if p != "body"]
    # Union members show up as type names in the location (prompt.str / prompt.list[str]): drop them.
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float", "bool"}))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.param, exc.kind, exc.headers, path=request.url.path)


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {"loc": ("body",), "msg": "invalid request"}
    path = request.url.path
    if first.get("type") == "json_invalid":
        return error_response(
            400,
            f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            "body",
            "invalid_request_error",
            path=path,
        )
    param = loc_to_param(tuple(first.get("loc", ())))
    return error_response(400, f"{param}: {first['msg']}", param, "invalid_request_error", path=path)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    param = "path" if exc.status_code == 404 else "method" if exc.status_code == 405 else None
    return error_response(
        exc.status_code,
        str(exc.detail),
        param,
        "not_found_error" if exc.status_code == 404 else "invalid_request_error",
        path=request.url.path,
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(
        500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error", path=request.url.path
    )


def install_handlers(app: FastAPI) -> None:
    """Every error ``app`` answers is JSON in its path's protocol shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
