"""One generation request as the scheduler and engine see it, and what a step reports about it."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from sapwood.infer.context import RopePlan
from sapwood.infer.sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    rope: RopePlan
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # what went wrong when finish_reason == "error"
    cancelled: bool = False
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # bool [vocab], only with a repetition penalty
    bias: torch.Tensor | None = None  # float32 [vocab], only with a logit_bias
    # with params.logprobs: per generated token (logprob of the chosen token, [(token id, logprob)] top-N)
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # with params.prompt_logprobs: per prompt token after the first, as above
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    stream: object | None = None  # a TextStream when the engine has a tokenizer
    adapter: str | None = None  # the LoRA adapter this request runs through (None: the base model)

    @property
    def total_tokens(self) -> int:
        """Positions this request may reach: the cache row must hold this many."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def fail(self, what: str) -> StepOutput:
        """Finish this request with ``finish_reason == "error"`` (``what``: why); its last output."""
        self.finish_reason, self.error = "error", what
        return StepOutput(self, [], "", True)


@dataclass
class StepOutput:
    """What one engine step produced for one request."""

    request: Request
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    new_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
