"""Error bodies in the shape of the protocol a path belongs to, naming the offending field.

- OpenAI paths (``/v1/...``): ``{"error": {"message", "type", "param", "code"}}``;
- KServe Open Inference Protocol paths (``/v2/...``): ``{"error": "<param>: <message>"}``, the
  protocol's error object (one string), so KServe and Triton clients parse it.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
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
