"""Pure ASGI middleware: API-key gate (401), body-size limit (413), JSON limits (400), request metrics.

The key check runs before the body is read, so an unauthenticated client learns nothing about the
request schema: with keys set, ``/v1/*``, ``/docs``, ``/redoc``, ``/openapi.json`` and ``/metrics`` need a
key (a Prometheus scrape job sends it as its bearer token). ``/health`` stays open for probes but tells a
client without a key only up or down (the handler reads ``scope["state"]["authenticated"]``). JSON bodies
(and bodies without a content type, which FastAPI parses as JSON) are checked against
:mod:`sapwood.serve.json_limits` before any handler parses them.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from sapwood.serve.auth import APIKeyAuth
from sapwood.serve.errors import APIError, error_body
from sapwood.serve.json_limits import JSONLimitError, check_json
from sapwood.serve.metrics import ServerMetrics

KNOWN_ROUTES = (
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/predict", "/health", "/metrics", "/docs",
    "/redoc", "/openapi.json",
)
KEYED_ROUTES = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/metrics")  # besides /v1/*
JSON_CHECK_IN_THREAD_BYTES = 64 * 1024


def is_json(content_type: bytes | None) -> bool:
    if not content_type:
        return True
    media = content_type.split(b";")[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


async def send_json_error(
    send: Any, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class GatewayMiddleware:
    """Metrics around every request; then the key gate; then the body limit (whole body buffered)."""

    def __init__(self, app: Any, auth: APIKeyAuth, metrics: ServerMetrics, max_body_bytes: int):
        self.app, self.auth, self.metrics, self.max_body_bytes = app, auth, metrics, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in KNOWN_ROUTES else "other"
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_recording(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self._gated(scope, receive, send_recording, path)
        finally:
            self.metrics.requests.labels(route, str(status_holder["status"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _gated(self, scope: dict, receive: Any, send: Any, path: str) -> None:
        authenticated = True
        if self.auth.enabled:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            try:
                self.auth.check(headers.get("authorization", ""))
            except APIError as exc:
                authenticated = False
                if path.startswith("/v1/") or path in KEYED_ROUTES:
                    self.metrics.rejected.labels("auth").inc()
                    await send_json_error(send, exc.status, exc.message, exc.code)
                    return
        scope.setdefault("state", {})["authenticated"] = authenticated
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False
        if is_json(dict(scope.get("headers", [])).get(b"content-type")) and body:
            try:
                if len(body) > JSON_CHECK_IN_THREAD_BYTES:
                    await asyncio.to_thread(check_json, body)
                else:
                    check_json(body)
            except JSONLimitError as exc:
                self.metrics.rejected.labels("json_limits").inc()
                await send_json_error(send, 400, str(exc), code="invalid_json")
                return

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        self.metrics.rejected.labels("body_too_large").inc()
        await send_json_error(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
