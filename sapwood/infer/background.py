"""The engine on its own thread, for callers on other threads or an asyncio loop (the server).

``submit`` validates and queues a request (through the scheduler, which owns the queue and its bound)
and returns at once; the loop thread steps the engine while there is work and hands every step's
:class:`StepOutput` s to their requests' callbacks, all of one step in one ``deliver`` call (the server
passes one that hops onto its event loop once per step). ``stop(drain=True)`` lets running and queued
requests finish first.

Supervision: an exception that escapes a step (the engine already isolates request errors) fails every
pending request with ``finish_reason == "error"``, frees the cache and restarts the loop; after
``max_restarts`` failures within ``restart_window_s`` the loop stays down: ``failure`` says why,
``submit`` raises :class:`EngineUnavailableError` at once and the server's ``/health`` answers 503 (the
``sapwood serve`` process then exits with status 3 for its supervisor to restart it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sapwood.errors import SapwoodError
from sapwood.infer.engine import Engine
from sapwood.infer.request import Request, StepOutput
from sapwood.infer.sampling import SamplingParams
from sapwood.infer.scheduler import QueueFullError

log = logging.getLogger("sapwood.infer")
OutputCallback = Callable[[StepOutput], None]
Deliver = Callable[[list[tuple[OutputCallback, StepOutput]]], None]


class EngineUnavailableError(SapwoodError):
    """The engine loop is down (failed repeatedly); new requests are refused at once."""


def deliver_now(items: list[tuple[OutputCallback, StepOutput]]) -> None:
    for callback, output in items:
        callback(output)


class EngineLoop:
    def __init__(self, engine: Engine, max_restarts: int = 3, restart_window_s: float = 60.0):
        self.engine = engine
        self.deliver: Deliver = deliver_now
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self._callbacks: dict[str, tuple[Request, OutputCallback]] = {}
        lock = threading.RLock()  # what threading.Condition() uses by default
        self._wake = threading.Condition(lock)  # the loop thread waits here for work
        self._idle = threading.Condition(lock)  # wait_idle callers wait here for the loop to run dry
        self._stopping = False
        self._thread = threading.Thread(target=self._supervise, name="sapwood-engine", daemon=True)
        self.failure: str | None = None  # why the loop is down for good
        self._waiting_for_work = False  # the loop thread is parked in _wake.wait()
        self.restarts: list[float] = []

    def start(self, deliver: Deliver | None = None) -> EngineLoop:
        if deliver is not None:
            self.deliver = deliver
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self.failure is None

    @property
    def queue_depth(self) -> int:
        return self.engine.scheduler.waiting_count

    @property
    def running(self) -> int:
        windowed = self.engine.windowed
        return self.engine.scheduler.running_count + (windowed.count if windowed is not None else 0)

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_output: OutputCallback,
        adapter: str | None = None,
    ) -> Request:
        """Queue a request. Raised here, synchronously: ContextLengthError, QueueFullError, KVBudgetError,
        EngineUnavailableError, SapwoodError (a value this model cannot take)."""
        if self.failure is not None:
            raise EngineUnavailableError(
                f"the inference engine is down ({self.failure}); retry on another replica"
            )
        if self._stopping:
            raise QueueFullError("the server is shutting down; retry on another replica")
        request = self.engine.make_request(prompt_ids, params, adapter)
        with self._wake:
            self._callbacks[request.request_id] = (request, on_output)
            try:
                self.engine.add_request(request)
            except BaseException:
                self._callbacks.pop(request.request_id, None)
                raise
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        self.engine.cancel(request)
        with self._wake:
            self._wake.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the engine holds no request, waiting or running, and the outputs of its last step
        have been handed to ``deliver`` (True); False after ``timeout`` seconds, or at once when the loop
        is down. The loop thread signals it each time it runs out of work: no polling."""
        with self._idle:
            return self._idle.wait_for(
                lambda: self.failure is not None or not self._thread.is_alive() or self._dry, timeout
            ) and self.failure is None and self._dry

    @property
    def _dry(self) -> bool:
        return self._waiting_for_work and not self.engine.has_work

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._wake:
            self._stopping = True
            if not drain:
                self.engine.scheduler.cancel_all()
                if self.engine.windowed is not None:
                    self.engine.windowed.cancel_all()
            self._wake.notify()
        self._thread.join(timeout)

    def _supervise(self) -> None:
        try:
            self._serve_and_restart()
        finally:  # stopped or down for good: nobody will run the engine dry any more
            with self._idle:
                self._idle.notify_all()

    def _serve_and_restart(self) -> None:
        while True:
            try:
                self._serve()
                return
            except BaseException as exc:  # noqa: BLE001 - report to every waiter, then restart or stay down
                log.exception("engine loop failed")
                self._fail_pending(f"{type(exc).__name__}: {exc}"[:200])
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < self.restart_window_s] + [now]
                if len(self.restarts) > self.max_restarts or not isinstance(exc, Exception):
                    self.failure = (
                        f"engine loop failed {len(self.restarts)} times in {self.restart_window_s:g} s; "
                        f"last: {type(exc).__name__}"
                    )
                    log.error("engine loop stays down: %s", self.failure)
                    return
                log.warning(
                    "restarting the engine loop (%d in the last %g s)",
                    len(self.restarts),
                    self.restart_window_s,
                )

    def _fail_pending(self, reason: str) -> None:
        with self._wake:
            self.engine.scheduler.abort_all("error")
            if self.engine.windowed is not None:
                self.engine.windowed.abort_all("error")
            pending, self._callbacks = list(self._callbacks.values()), {}
        try:
            self.engine.runner.cache.fit(0, 0)
        except Exception:  # noqa: BLE001
            log.exception("could not free the KV cache")
        items = [(callback, request.fail(f"the inference engine failed ({reason})"))
                 for request, callback in pending]
        if items:
            self.deliver(items)

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not engine.has_work and not self._stopping:
                    self._waiting_for_work = True
                    self._idle.notify_all()
                    self._wake.wait()
                self._waiting_for_work = False
                if self._stopping and not engine.has_work:
                    return
            outputs = engine.step()
            items = []
            with self._wake:
                for output in outputs:
                    request_id = output.request.request_id
                    entry = (
                        self._callbacks.pop(request_id, None)
                        if output.finished
                        else self._callbacks.get(request_id)
                    )
                    if entry is not None:
                        items.append((entry[1], output))
            if items:
                self.deliver(items)
