"""The engine on its own thread, for callers on other threads or an asyncio loop (the server).

``submit`` validates and queues a request and returns at once; the loop thread steps the engine while
there is work and hands every :class:`StepOutput` to the request's callback (on the loop thread, so a
callback must only hand off, e.g. ``loop.call_soon_threadsafe``). ``stop(drain=True)`` lets running and
queued requests finish first.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from sapwood.infer.engine import Engine
from sapwood.infer.request import Request, StepOutput
from sapwood.infer.sampling import SamplingParams
from sapwood.infer.scheduler import QueueFullError

log = logging.getLogger("sapwood.infer")
OutputCallback = Callable[[StepOutput], None]


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._incoming: deque[tuple[Request, OutputCallback]] = deque()
        self._callbacks: dict[str, tuple[Request, OutputCallback]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sapwood-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._incoming) + len(self.engine.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.scheduler.running)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_output: OutputCallback) -> Request:
        """Queue a request (ContextLengthError / QueueFullError / SapwoodError raised here, synchronously)."""
        if self._stopping:
            raise QueueFullError("the server is shutting down; retry on another replica")
        request = self.engine.make_request(prompt_ids, params)
        with self._wake:
            if self.queue_depth >= self.engine.scheduler.config.max_waiting:
                raise QueueFullError(
                    f"the request queue is full ({self.engine.scheduler.config.max_waiting} waiting); retry later"
                )
            self._incoming.append((request, on_output))
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        self.engine.cancel(request)
        with self._wake:
            self._wake.notify()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._wake:
            self._stopping = True
            if not drain:
                for request, _ in self._incoming:
                    request.cancelled = True
                for request in list(self.engine.scheduler.waiting) + self.engine.scheduler.running:
                    request.cancelled = True
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._wake:
                    while not self._incoming and not engine.has_work and not self._stopping:
                        self._wake.wait()
                    if self._stopping and not self._incoming and not engine.has_work:
                        return
                    while self._incoming:
                        request, callback = self._incoming.popleft()
                        self._callbacks[request.request_id] = (request, callback)
                        engine.scheduler.waiting.append(request)
                for output in engine.step():
                    entry = self._callbacks.get(output.request.request_id)
                    if output.finished:
                        self._callbacks.pop(output.request.request_id, None)
                    if entry is not None:
                        entry[1](output)
        except BaseException as exc:  # surface to waiters: every pending request finishes as an error
            self.error = exc
            log.exception("engine loop failed")
            for request_id, (request, callback) in list(self._callbacks.items()):
                self._callbacks.pop(request_id, None)
                request.finish_reason = "error"
                callback(StepOutput(request, [], "", True))
