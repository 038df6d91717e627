"""Serving requests longer than the maximum context with attention sinks + a sliding window (StreamingLLM).

With ``sapwood serve --context-overflow window`` a request whose prompt + ``max_tokens`` passes the model's
``max_context`` (or could never fit the KV budget) is not refused: :class:`WindowedRequests` runs it
through its own :class:`~sapwood.infer.window.SinkWindowCache`, which holds the first ``sinks`` tokens and
the most recent ``window`` ones, ``sinks + window`` positions at most whatever the request's length.

The engine advances every windowed request once per engine step, next to its batched step: a prompt
is fed in chunks (as many tokens as the cache still has room for in one forward, then one token per
forward once it is full, at most ``prefill_tokens_per_step`` prompt tokens per step so the batched
requests keep their pace), then one new token per step. Sampling, log-probabilities, stop strings,
EOS, ``max_tokens`` and errors go through :meth:`Engine.accept <sapwood.infer.engine.Engine.accept>`,
as the batched requests' do, so a windowed request finishes exactly as a batched one; a cancelled one
(client gone, server stopping) is dropped at the next step and its cache freed. While a request fits
the window (no token evicted yet) its greedy output equals the normal path's; past that each token sees
the sinks and the last ``window - 1`` tokens before it.

Memory: ``max_requests × (sinks + window) × bytes per position`` at most, besides the batched cache;
more windowed requests at once get :class:`~sapwood.infer.scheduler.QueueFullError` (429).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from sapwood.errors import SapwoodError
from sapwood.infer.context import ContextLengthError, rope_tables
from sapwood.infer.request import Request, Status, StepOutput
from sapwood.infer.sampling import SamplingParams, token_logprobs
from sapwood.infer.scheduler import QueueFullError
from sapwood.infer.window import SinkWindowCache

log = logging.getLogger("sapwood.infer")


@dataclass
class _Windowed:
    request: Request
    cache: SinkWindowCache
    fed: int = 0  # prompt tokens already in the cache


class WindowedRequests:
    """The requests an :class:`~sapwood.infer.engine.Engine` serves past its maximum context."""

    def __init__(
        self, engine, sinks: int = 4, window: int | None = None, max_requests: int = 4,
        prefill_tokens_per_step: int = 64,
    ):
        max_context = engine.cfg.max_context
        window = max_context - sinks if window is None else window
        if sinks < 0 or window < 1 or sinks + window > max_context:
            raise SapwoodError(
                f"--sinks {sinks} --window {window}: need sinks >= 0, window >= 1 and sinks + window <= "
                f"{max_context} (the model's maximum context)"
            )
        if max_requests < 1 or prefill_tokens_per_step < 1:
            raise SapwoodError(
                f"windowed max_requests={max_requests} and prefill_tokens_per_step="
                f"{prefill_tokens_per_step}: both must be >= 1"
            )
        self.engine = engine
        self.sinks, self.window, self.capacity = sinks, window, sinks + window
        self.max_requests, self.prefill_tokens_per_step = max_requests, prefill_tokens_per_step
        self.plan = engine.policy.rope_for(self.capacity)  # positions never reach the capacity
        self.peak_positions = 0  # the most positions any windowed cache has held (bounded by the capacity)
        self.served = 0
        self._active: list[_Windowed] = []
        self._lock = threading.Lock()

    # --- what other threads may call -----------------------------------------------------------------
    def takes(self, prompt_tokens: int, params: SamplingParams) -> bool:
        """Whether a request goes through the window: longer than the maximum context, or more KV than the
        batched cache's whole budget."""
        if prompt_tokens < 1:
            raise ContextLengthError("the prompt is empty; give at least one token")
        total = prompt_tokens + params.max_tokens
        budget = self.engine.scheduler.budget
        return total > self.engine.cfg.max_context or budget.bytes_for(1, total) > budget.max_bytes

    def add(self, request: Request) -> Request:
        cache = SinkWindowCache(self.engine.cfg.layers, self.sinks, self.window, self.plan.inv_freq)
        with self._lock:
            if len(self._active) >= self.max_requests:
                raise QueueFullError(
                    f"{self.max_requests} requests past the maximum context are running "
                    "(--window-requests); retry later"
                )
            request.status = Status.RUNNING
            self._active.append(_Windowed(request, cache))
            self.served += 1
        return request

    @property
    def count(self) -> int:
        return len(self._active)

    @property
    def has_work(self) -> bool:
        return bool(self._active)

    def cancel_all(self) -> None:
        with self._lock:
            for entry in self._active:
                entry.request.cancelled = True

    def abort_all(self, reason: str) -> list[Request]:
        with self._lock:
            aborted, self._active = [e.request for e in self._active], []
        for request in aborted:
            request.finish_reason, request.status = reason, Status.FINISHED
        return aborted

    # --- the engine thread -----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Advance every windowed request once; their outputs (finished ones are dropped)."""
        with self._lock:
            active = list(self._active)
        outputs: list[StepOutput] = []
        ready: list[tuple[_Windowed, torch.Tensor]] = []
        for entry in active:
            if entry.request.cancelled:
                entry.request.finish_reason = "cancelled"
                outputs.append(StepOutput(entry.request, [], "", True))
                continue
            try:
                logits = self._advance(entry)
            except Exception:  # noqa: BLE001 - a failed forward fails this request only
                log.exception("windowed step failed for %s", entry.request.request_id)
                outputs.append(entry.request.fail("the windowed inference step failed"))
                continue
            if logits is not None:
                ready.append((entry, logits))
        if ready:
            outputs += self.engine.accept(
                [e.request for e, _ in ready], torch.stack([lg for _, lg in ready])
            )
        finished = {id(o.request) for o in outputs if o.finished}
        if finished:
            with self._lock:
                self._active = [e for e in self._active if id(e.request) not in finished]
            for output in outputs:
                if output.finished:
                    output.request.status = Status.FINISHED
        return outputs

    @torch.inference_mode()
    def _advance(self, entry: _Windowed) -> torch.Tensor | None:
        """Feed the next prompt chunk or the last sampled token; the next-token logits once the prompt
        is in."""
        request, cache = entry.request, entry.cache
        prompt = request.prompt_ids
        if entry.fed == len(prompt):
            return self._forward(entry, [request.output_ids[-1]], scored=False)[-1]
        budget, logits = self.prefill_tokens_per_step, None
        while budget > 0 and entry.fed < len(prompt):
            room = cache.capacity - cache.length
            size = min(room, budget, len(prompt) - entry.fed) if room > 0 else 1
            chunk = prompt[entry.fed : entry.fed + size]
            logits = self._forward(entry, chunk, scored=request.params.prompt_logprobs)
            if request.params.prompt_logprobs:
                self._score_prompt(entry, logits)
            entry.fed += size
            budget -= size
        return logits[-1] if entry.fed == len(prompt) else None

    def _forward(self, entry: _Windowed, tokens: list[int], scored: bool) -> torch.Tensor:
        """Run ``tokens`` into the request's window; logits ``[len(tokens) or 1, vocab]`` (all when
        scored)."""
        engine, cache = self.engine, entry.cache
        device = engine.runner.device
        if len(tokens) == 1:
            first = cache.next_position()  # evicts the oldest window token when full
        else:
            first = cache.length  # a chunk that fits the room left
        positions = torch.arange(first, first + len(tokens), device=device)[None, :]
        at = torch.arange(len(tokens) if scored else 1, device=device) + (0 if scored else len(tokens) - 1)
        adapters = [entry.request.adapter] if engine.adapters else None
        with engine.runner.adapters_of_rows(adapters):
            logits = engine.model(
                torch.tensor([tokens], device=device), kv_cache=cache,
                rope=rope_tables(positions, [self.plan]), logits_at=at,
            )
        self.peak_positions = max(self.peak_positions, cache.length)
        return logits

    def _score_prompt(self, entry: _Windowed, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens that ``logits`` (one row per fed token) predict."""
        request = entry.request
        start = entry.fed + 1  # logits row i predicts prompt token fed + i + 1
        chosen = request.prompt_ids[start : start + len(logits)]
        if request.prompt_logprobs is None:
            request.prompt_logprobs = []
        request.prompt_logprobs += token_logprobs(logits[: len(chosen)], chosen, request.params.logprobs or 0)
