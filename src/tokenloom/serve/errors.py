"""Errors as OpenAI's API reports them: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import re

# engine / pipeline message prefixes -> the request field a client set
_PARAMS = [
    (re.compile(r"exceeds the model's context"), "messages", "context_length_exceeded"),
    (re.compile(r"^(request \d+: )?max_new_tokens"), "max_tokens", None),
    (re.compile(r"needs \d+ tokens, more than max_new_tokens"), "max_tokens", None),
    (re.compile(r"^(request \d+: )?image size|is not drawable|draws \d+x\d+ images only|maximum side"), "size", None),
    (re.compile(r"^(request \d+: )?guidance_scale"), "guidance_scale", None),
    (re.compile(r"^width"), "width", None),
    (re.compile(r"^height"), "height", None),
    (re.compile(r"^(request \d+: )?seed"), "seed", None),
    (re.compile(r"^prompt"), "prompt", None),
]

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         429: "requests", 499: "invalid_request_error", 503: "server_error"}


class APIError(Exception):
    """An HTTP error with OpenAI's error body; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(error: Exception, default_param: str | None = None) -> APIError:
    """A ValueError of the pipeline or the engine (bad input it found) as a 400 naming the field."""
    if isinstance(error, APIError):
        return error
    message = str(error) or type(error).__name__
    for pattern, param, code in _PARAMS:
        if pattern.search(message):
            return bad_request(message, param, code)
    return bad_request(message, default_param)
