"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, as the OpenAI
client, lm-eval and vLLM's clients parse them."""
from __future__ import annotations

import json
from typing import Optional

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 500: "internal_error", 503: "server_overloaded"}


class APIError(Exception):
    """A request that gets a ``status`` answer; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


def field_path(loc) -> Optional[str]:
    """``prompt[0][3]`` from pydantic's location tuple (``("body", "prompt", 0, 3)``)."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    text = str(parts[0])
    for p in parts[1:]:
        text += f"[{p}]" if isinstance(p, int) else f".{p}"
    return text
