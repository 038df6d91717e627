"""Running the app under uvicorn: ``sapwood serve``, and a background server for tests, bench and demo.

With no ``SAPWOOD_API_KEYS`` the server is open, so it binds loopback only (and says so). On SIGTERM /
SIGINT uvicorn stops accepting, waits for in-flight requests (up to ``graceful_shutdown_s``), then the
engine drains and stops. When the engine loop stays down (it failed repeatedly, see
:mod:`sapwood.infer.background`), ``sapwood serve`` stops and exits with status :data:`ENGINE_DOWN_EXIT`
so that its supervisor (systemd, Kubernetes) restarts it.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from sapwood.errors import SapwoodError
from sapwood.serve.app import create_app
from sapwood.serve.settings import API_KEYS_ENV, LOOPBACK_HOSTS, ServeSettings, api_keys_from_env

log = logging.getLogger("sapwood.serve")
ENGINE_DOWN_EXIT = 3


def resolve_host(host: str, keys: frozenset[str]) -> str:
    """The host to bind: anything with keys; loopback only without them."""
    if keys or host in LOOPBACK_HOSTS:
        if not keys:
            log.warning("no %s set: the API is open, bound to loopback %s only", API_KEYS_ENV, host)
        return host
    log.warning("no %s set: the API is open, so binding loopback 127.0.0.1 instead of %s", API_KEYS_ENV, host)
    return "127.0.0.1"


EVENT_LOOP = "asyncio" if sys.platform == "win32" else "uvloop"  # uvloop has no Windows build


def uvicorn_config(app, settings: ServeSettings, host: str, port: int) -> uvicorn.Config:
    """uvicorn on ``httptools`` (the C HTTP/1.1 parser) and ``uvloop`` (the libuv event loop), named here so
    the server does not change with what else is installed: the pure-Python ``h11`` parser and asyncio's
    loop cost about a third more event-loop CPU per streamed event."""
    return uvicorn.Config(
        app, host=host, port=port, http="httptools", loop=EVENT_LOOP, log_level="warning", access_log=False,
        timeout_graceful_shutdown=settings.graceful_shutdown_s, lifespan="on",
    )


def run_server(folder: str | Path, settings: ServeSettings, device: str = "cpu") -> None:
    """Serve until SIGINT/SIGTERM (blocking)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = api_keys_from_env()
    host = resolve_host(settings.host, keys)
    app = create_app(folder, settings, keys, device=device)
    # the model, libraries and app built so far live as long as the process: out of the collector's sight,
    # a full collection (every few seconds under load) scans only what serving allocates, instead of
    # stopping every thread ~0.2 s to walk the whole heap
    gc.collect()
    gc.freeze()
    config = uvicorn_config(app, settings, host, settings.port)
    # bound and listening before the address is logged (port 0: the system picks one): a client that reads
    # the address can connect at once; its connection waits in the backlog until uvicorn accepts it
    sock = config.bind_socket()
    sock.listen(config.backlog)
    log.info(
        "sapwood serve on http://%s:%d (%d API key(s) configured)", host, sock.getsockname()[1], len(keys)
    )
    # uvicorn drains, then re-raises the captured SIGTERM/SIGINT to the previous handler: make that a
    # no-op so a graceful shutdown exits with status 0 instead of dying by the signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server = uvicorn.Server(config)
    engine_loop = app.state.engine_loop
    if engine_loop is not None:
        threading.Thread(target=_exit_when_engine_down, args=(server, engine_loop), daemon=True).start()
    server.run(sockets=[sock])
    if engine_loop is not None and engine_loop.failure:
        log.error("sapwood serve stopped: %s", engine_loop.failure)
        raise SystemExit(ENGINE_DOWN_EXIT)
    log.info("sapwood serve stopped after draining in-flight requests")


def _exit_when_engine_down(server: uvicorn.Server, engine_loop) -> None:
    while not server.should_exit:
        if engine_loop.failure:
            server.should_exit = True
            return
        time.sleep(0.5)


class BackgroundServer:
    """A real uvicorn server on a free loopback port, in a thread (tests, bench, demo).

    ``with BackgroundServer(app) as server: server.url`` ; leaving the block shuts it down gracefully.
    """

    def __init__(self, app, settings: ServeSettings | None = None, port: int | None = None):
        self.settings = settings or ServeSettings()
        # bound here and handed to uvicorn: a port looked up first and bound later can be taken in between
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", port or 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, self.settings, "127.0.0.1", self.port))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="sapwood-uvicorn", daemon=True
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SapwoodError(f"the server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
