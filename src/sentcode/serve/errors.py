"""The server's error shape, ``{"error": {"message", "type", "param", "code"}}``, and request-validation errors as
400s that name the field."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def param_path(loc) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0]
    kind, param = err.get("type", "invalid"), param_path(err.get("loc", ()))
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return ApiError(400, f"malformed JSON body: {detail}".rstrip(": "), None, "json_invalid")
    if param is None:
        if kind == "missing":
            return ApiError(400, "the request needs a JSON object body", None, "missing_body")
        return ApiError(400, "the request body must be a JSON object", None, kind)
    if kind == "missing":
        return ApiError(400, f"missing required field '{param}'", param, "missing")
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field '{param}'", param, "unknown_field")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return ApiError(400, f"invalid '{param}': {msg}", param, kind)
