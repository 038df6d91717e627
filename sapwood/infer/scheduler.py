"""The scheduler decides, the runner executes (the vLLM split).

Each step the scheduler drops cancelled requests, then admits waiting ones into the running batch
(first come, first served) while there is a free slot, the KV budget holds and the step's prefill
budget is not spent. It knows nothing of tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sapwood.errors import SapwoodError
from sapwood.infer.request import Request, Status


class QueueFullError(SapwoodError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass
class SchedulerConfig:
    max_batch: int = 64  # running requests (cache slots)
    max_waiting: int = 256  # bounded queue
    max_kv_tokens: int = 1 << 20  # slots * capacity the cache may reach
    max_prefill_tokens: int = 4096  # padded prompt tokens prefilled per step


@dataclass
class Schedule:
    admitted: list[Request]
    cancelled: list[Request]


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i] lives in cache slot i

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the request queue is full ({self.config.max_waiting} waiting); retry later")
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        cancelled = [r for r in self.waiting if r.cancelled]
        if cancelled:
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        cancelled += [r for r in self.running if r.cancelled]
        admitted: list[Request] = []
        longest = max((r.total_tokens for r in self.running if not r.cancelled), default=0)
        rows = sum(1 for r in self.running if not r.cancelled)
        prefill_width = 0
        while self.waiting and rows < self.config.max_batch:
            candidate = self.waiting[0]
            width = max(prefill_width, len(candidate.prompt_ids))
            new_longest = max(longest, candidate.total_tokens)
            if admitted and width * (len(admitted) + 1) > self.config.max_prefill_tokens:
                break
            if rows and new_longest * (rows + 1) > self.config.max_kv_tokens:
                break
            self.waiting.popleft()
            candidate.status = Status.RUNNING
            admitted.append(candidate)
            longest, prefill_width, rows = new_longest, width, rows + 1
        return Schedule(admitted, cancelled)
