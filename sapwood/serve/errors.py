"""Every error leaves the server as OpenAI-format JSON: ``{"error": {"message", "type", "param", "code"}}``.

Status codes: 400 malformed JSON, a body that breaks the JSON limits (depth, digits, non-finite numbers)
or an unservable request (context too long, empty prompt, a value this model cannot take); 401 missing
or wrong API key; 404 unknown model or route; 413 body too large, a declared array too large, or a
request that needs more KV cache than the server's whole budget; 415 unsupported content type; 422 a
field of the wrong type or out of range, or a prediction that is not finite; 429 queue full (with
``Retry-After``); 500 an internal failure of this one request (the server keeps serving); 503 the
engine is down or the server is shutting down; 504 request timed out.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("sapwood.serve")

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error",
}


NOT_AN_OBJECT = ("missing", "model_attributes_type", "model_type", "dict_type")


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code,
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field, its value and what is allowed; and the field's name."""
    # unknown fields first; in a union, a broken constraint before "not this type" of the other members
    errors = sorted(
        exc.errors(), key=lambda e: (e.get("type") != "extra_forbidden", e.get("type", "").endswith("_type"))
    )
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    param = ".".join(loc) or None
    value = first.get("input")
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}; see /openapi.json for this request's fields", param
    shown = "" if isinstance(value, dict | list) or value is None else f"={value!r}"
    if len(shown) > 60:
        shown = shown[:57] + "…"
    where = f"{param}{shown}: " if param else ""
    return f"{where}{first['msg'].removeprefix('Value error, ')}", param


def _is_union_tag(part: object) -> bool:
    """pydantic names the union member an error came from in ``loc`` (``str``, ``list[int]``, ...)."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON")
        if errors and tuple(errors[0].get("loc", ())) == ("body",) and errors[0].get("type") in NOT_AN_OBJECT:
            kind = "missing" if errors[0].get("type") == "missing" else type(errors[0].get("input")).__name__
            return error_response(400, f"the request body must be a JSON object, got {kind}")
        message, param = validation_message(exc)
        return error_response(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")
