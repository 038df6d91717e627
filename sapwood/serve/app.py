"""The app factory: one FastAPI app per checkpoint folder.

A language-model folder gets the OpenAI-compatible text routes over a continuous-batching engine; a
datacube-surrogate folder gets ``POST /v1/predict`` from :mod:`sapwood.serve.predict` (see
:func:`mount_predict_routes`, the hook). Both get ``/health``, ``/metrics``, API keys, body limits and
OpenAI-format errors.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sapwood.errors import SapwoodError
from sapwood.infer.background import EngineLoop, deliver_now
from sapwood.infer.engine import Engine
from sapwood.infer.scheduler import SchedulerConfig
from sapwood.serve.auth import APIKeyAuth
from sapwood.serve.errors import install_error_handlers
from sapwood.serve.metrics import ServerMetrics
from sapwood.serve.middleware import GatewayMiddleware
from sapwood.serve.settings import ServeSettings, api_keys_from_env
from sapwood.serve.text_api import TextService, build_text_router

log = logging.getLogger("sapwood.serve")


def is_cube_checkpoint(folder: Path) -> bool:
    """A datacube surrogate's config.yaml has a ``cube`` section."""
    path = folder / "config.yaml"
    if not path.exists():
        raise SapwoodError(f"{folder}: no config.yaml; not a sapwood checkpoint folder")
    data = yaml.safe_load(path.read_text()) or {}
    return isinstance(data, dict) and data.get("cube") is not None


GENERIC_FOLDER_NAMES = re.compile(r"^(final|latest|step_\d+)$")


def default_model_name(folder: Path) -> str:
    """The served model's name: the folder's name, or for a training output such as ``RUN/final`` or
    ``RUN/checkpoints/step_100`` the run's folder name (``RUN``)."""
    path = folder.resolve()
    while GENERIC_FOLDER_NAMES.match(path.name) or path.name == "checkpoints":
        if path.parent == path:
            break
        path = path.parent
    return path.name or "model"


def mount_predict_routes(app: FastAPI, folder: Path, settings: ServeSettings, device: str) -> None:
    """``POST /v1/predict`` for a datacube surrogate; its request schema joins the OpenAPI document."""
    from sapwood.serve import predict

    router, components = predict.create_router(folder, settings, device)
    app.include_router(router)
    app.state.openapi_components.update(components)


def build_engine(folder: Path, settings: ServeSettings, device: str = "cpu") -> Engine:
    kv_bytes = int(settings.kv_memory_gb * 1e9) if settings.kv_memory_gb else None
    scheduler = SchedulerConfig(
        max_batch=settings.max_batch, max_waiting=settings.max_queue, kv_memory_bytes=kv_bytes
    )
    engine = Engine.from_folder(folder, scheduler, device=device)
    for name, adapter in settings.lora_adapters.items():
        engine.load_adapter(name, adapter)
    if settings.context_overflow == "window":
        engine.enable_window(settings.sinks, settings.window, settings.window_requests)
    return engine


def create_app(
    folder: str | Path, settings: ServeSettings | None = None, api_keys: frozenset[str] | None = None,
    engine: Engine | None = None, device: str = "cpu",
) -> FastAPI:
    """The server app for a checkpoint folder (``engine`` may be passed in, already loaded)."""
    folder = Path(folder)
    settings = settings or ServeSettings()
    keys = api_keys_from_env() if api_keys is None else api_keys
    model_name = settings.model_name or default_model_name(folder)
    cube = is_cube_checkpoint(folder)
    if settings.lora_adapters and (cube or model_name in settings.lora_adapters):
        raise SapwoodError(
            f"--lora {model_name}=...: an adapter needs a name other than the base model's"
            if not cube
            else "--lora: LoRA adapters are served on language models, not cube surrogates"
        )
    loop = None if cube else EngineLoop(engine or build_engine(folder, settings, device))
    metrics = ServerMetrics(
        queue_depth=lambda: loop.queue_depth if loop else 0,
        running=lambda: loop.running if loop else 0,
        kv_usage=lambda: loop.engine.kv_cache_usage if loop else 0.0,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loop is not None:  # each step's outputs hop onto the event loop in one call
            event_loop = asyncio.get_running_loop()
            loop.start(deliver=lambda items: event_loop.call_soon_threadsafe(deliver_now, items))
        log.info("serving %s (%s)", model_name, "datacube surrogate" if cube else "language model")
        yield
        if loop is not None:  # uvicorn has already drained in-flight requests; let the engine finish too
            loop.stop(drain=True, timeout=settings.graceful_shutdown_s)

    app = FastAPI(
        title="sapwood",
        version="0.1.0",
        lifespan=lifespan,
        description=f"sapwood serving {model_name!r}. Errors are OpenAI-shaped: "
        '{"error": {"message", "type", "param", "code"}}.',
    )
    app.state.settings, app.state.metrics, app.state.engine_loop = settings, metrics, loop
    app.state.openapi_components = {}
    _with_extra_components(app)
    install_error_handlers(app)
    app.add_middleware(
        GatewayMiddleware, auth=APIKeyAuth(keys), metrics=metrics, max_body_bytes=settings.max_body_bytes
    )

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Up or down (200 / 503); with a key (or none configured) also why, the model and the load."""
        ready = loop.alive if loop is not None else True
        body: dict = {"status": "ok" if ready else "unavailable"}
        if request.scope.get("state", {}).get("authenticated", True):
            body |= {
                "live": True, "ready": ready, "model": model_name, "running": loop.running if loop else 0,
                "queued": loop.queue_depth if loop else 0, "time": time.time(),
            }
            if loop is not None and loop.failure:
                body["reason"] = loop.failure
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if cube:
        mount_predict_routes(app, folder, settings, device)
    else:
        app.include_router(build_text_router(TextService(loop, settings, metrics, model_name)))
    return app


def _with_extra_components(app: FastAPI) -> None:
    """Schemas that routes reference through ``openapi_extra`` join ``components.schemas``."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()  # cached by FastAPI until the routes change
        schema.setdefault("components", {}).setdefault("schemas", {}).update(app.state.openapi_components)
        return schema

    app.openapi = openapi
