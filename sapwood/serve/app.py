"""The app factory: one FastAPI app per checkpoint folder.

A language-model folder gets the OpenAI-compatible text routes over a continuous-batching engine; a
datacube-surrogate folder gets ``POST /v1/predict`` from :mod:`sapwood.serve.predict` (see
:func:`mount_predict_routes`, the hook). Both get ``/health``, ``/metrics``, API keys, body limits and
OpenAI-format errors.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import yaml
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sapwood.errors import SapwoodError
from sapwood.infer.background import EngineLoop
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


def mount_predict_routes(app: FastAPI, folder: Path, settings: ServeSettings) -> None:
    """Hook for datacube surrogates: ``sapwood.serve.predict`` provides the ``POST /v1/predict`` router,
    as ``create_router(folder)`` / ``build_router(folder)`` returning an ``APIRouter``, or a module-level
    ``router``."""
    from sapwood.serve import predict

    for factory_name in ("create_router", "build_router", "make_router"):
        factory = getattr(predict, factory_name, None)
        if factory is not None:
            app.include_router(factory(folder))
            return
    app.include_router(predict.router)


def build_engine(folder: Path, settings: ServeSettings, device: str = "cpu") -> Engine:
    scheduler = SchedulerConfig(max_batch=settings.max_batch, max_waiting=settings.max_queue,
                                max_kv_tokens=settings.max_kv_tokens)
    return Engine.from_folder(folder, scheduler, device=device)


def create_app(
    folder: str | Path,
    settings: ServeSettings | None = None,
    api_keys: frozenset[str] | None = None,
    engine: Engine | None = None,
    device: str = "cpu",
) -> FastAPI:
    """The server app for a checkpoint folder (``engine`` may be passed in, already loaded)."""
    folder = Path(folder)
    settings = settings or ServeSettings()
    keys = api_keys_from_env() if api_keys is None else api_keys
    model_name = settings.model_name or folder.resolve().name
    cube = is_cube_checkpoint(folder)
    loop = None if cube else EngineLoop(engine or build_engine(folder, settings, device))
    metrics = ServerMetrics(
        queue_depth=lambda: loop.queue_depth if loop else 0,
        running=lambda: loop.running if loop else 0,
        kv_usage=lambda: loop.engine.kv_cache_usage if loop else 0.0,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loop is not None:
            loop.start()
        log.info("serving %s (%s)", model_name, "datacube surrogate" if cube else "language model")
        yield
        if loop is not None:  # uvicorn has already drained in-flight requests; let the engine finish too
            loop.stop(drain=True, timeout=settings.graceful_shutdown_s)

    app = FastAPI(title="sapwood", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.engine_loop = settings, metrics, loop
    install_error_handlers(app)
    app.add_middleware(GatewayMiddleware, auth=APIKeyAuth(keys), metrics=metrics,
                       max_body_bytes=settings.max_body_bytes)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = loop.alive if loop is not None else True
        body = {"status": "ok" if ready else "unavailable", "live": True, "ready": ready, "model": model_name,
                "running": loop.running if loop else 0, "queued": loop.queue_depth if loop else 0,
                "time": time.time()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if cube:
        mount_predict_routes(app, folder, settings)
    else:
        app.include_router(build_text_router(TextService(loop, settings, metrics, model_name)))
    return app
