"""The scheduler decides, the runner executes (the vLLM split). The scheduler owns request state.

It holds the waiting queue (bounded: :class:`QueueFullError` past ``max_waiting``, the one place that
bound lives) and the running batch (``running[i]`` lives in KV-cache row ``i``). Each step it drops
cancelled requests, then admits waiting ones (first come, first served) while there is a free row,
the KV budget holds and the step's prefill budget is not spent, and groups them into prefill batches of
similar prompt length (:func:`prefill_groups`, less padding). ``finish`` retires requests and says
which cache rows moved. Nobody else edits ``waiting`` or ``running``. Thread-safe: requests are added
and cancelled from other threads while the engine thread schedules. It knows nothing of tensors.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from sapwood.errors import SapwoodError
from sapwood.infer.kv_cache import KVBudget
from sapwood.infer.request import Request, Status


class QueueFullError(SapwoodError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass
class SchedulerConfig:
    max_batch: int = 64  # running requests (cache rows)
    max_waiting: int = 256  # bounded queue
    max_prefill_tokens: int = 4096  # padded prompt tokens prefilled per step
    kv_memory_bytes: int | None = None  # KV-cache budget; None = half the memory free at start


@dataclass
class Schedule:
    admitted: list[Request]  # in prefill order: ``prefill`` flattened
    cancelled: list[Request]
    prefill: list[list[Request]] = field(default_factory=list)  # one padded forward each


PREFILL_CALL_TOKENS = 32  # one more prefill forward costs about as much as this many more padded tokens


def prefill_groups(requests: list[Request], call_tokens: int = PREFILL_CALL_TOKENS) -> list[list[Request]]:
    """``requests`` in prefill batches of similar prompt length: sorted by length, then cut so that the padded
    tokens (each batch is as wide as its longest prompt) plus ``call_tokens`` per batch are fewest (exact, by
    dynamic programming over the sorted order)."""
    ordered = sorted(requests, key=lambda r: len(r.prompt_ids))
    lengths = [len(r.prompt_ids) for r in ordered]
    best, cut = [0] + [float("inf")] * len(ordered), [0] * (len(ordered) + 1)
    for end in range(1, len(ordered) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * lengths[end - 1] + call_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(ordered)
    while end:
        groups.append(ordered[cut[end] : end])
        end = cut[end]
    return groups[::-1]


class Scheduler:
    def __init__(self, config: SchedulerConfig, budget: KVBudget):
        self.config = config
        self.budget = budget
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._lock = threading.Lock()

    # --- what other threads may call -----------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue ``request``; raises KVBudgetError when it could never fit, QueueFullError at the bound."""
        self.budget.check_alone(request.total_tokens)
        with self._lock:
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFullError(
                    f"the request queue is full ({self.config.max_waiting} waiting); retry later"
                )
            request.status = Status.WAITING
            self._waiting.append(request)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def running(self) -> tuple[Request, ...]:
        """The running batch in cache-row order (a snapshot)."""
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        with self._lock:
            return tuple(self._waiting)

    def live_tokens(self) -> int:
        return sum(r.length for r in self._running)

    # --- the engine thread ---------------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        with self._lock:
            cancelled = [r for r in self._waiting if r.cancelled]
            if cancelled:
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
        cancelled += [r for r in self._running if r.cancelled]
        admitted: list[Request] = []
        live = [r for r in self._running if not r.cancelled]
        longest = max((r.total_tokens for r in live), default=0)
        rows, prefill_width = len(live), 0
        with self._lock:
            while self._waiting and rows < self.config.max_batch:
                candidate = self._waiting[0]
                width = max(prefill_width, len(candidate.prompt_ids))
                new_longest = max(longest, candidate.total_tokens)
                if admitted and width * (len(admitted) + 1) > self.config.max_prefill_tokens:
                    break
                # the cancelled rows are still allocated until retired this step: count them
                if not self.budget.fits(
                    len(self._running) + len(admitted) + 1,
                    max(new_longest, max((r.total_tokens for r in self._running), default=0)),
                ):
                    break
                self._waiting.popleft()
                admitted.append(candidate)
                longest, prefill_width, rows = new_longest, width, rows + 1
        groups = prefill_groups(admitted)
        return Schedule([r for group in groups for r in group], cancelled, groups)

    def start(self, admitted: list[Request]) -> int:
        """Append ``admitted`` to the running batch; returns the first row they occupy."""
        first = len(self._running)
        for request in admitted:
            request.status = Status.RUNNING
        self._running.extend(admitted)
        return first

    def finish(self, requests: list[Request], reason: str | None = None) -> list[tuple[int, int]]:
        """Retire ``requests`` (setting ``finish_reason`` when given); returns the cache-row moves
        ``(source, target)`` that keep running rows contiguous, in the order to apply them."""
        moves = []
        for request in requests:
            if reason is not None:
                request.finish_reason = reason
            request.status = Status.FINISHED
            if request not in self._running:
                continue
            row = self._running.index(request)
            last = len(self._running) - 1
            if row != last:
                moves.append((last, row))
                self._running[row] = self._running[last]
            self._running.pop()
        return moves

    def abort_all(self, reason: str) -> list[Request]:
        """Finish every waiting and running request with ``reason`` (engine failure or shutdown)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        everything = list(self._running) + waiting
        self._running = []
        for request in everything:
            request.finish_reason, request.status = reason, Status.FINISHED
        return everything

    def cancel_all(self) -> None:
        with self._lock:
            for request in list(self._waiting) + self._running:
                request.cancelled = True

    def longest_running(self) -> int:
        return max((r.total_tokens for r in self._running), default=0)
