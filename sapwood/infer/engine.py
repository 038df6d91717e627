"""The engine: continuous batching of many requests over one model.

``step()`` asks the scheduler what to run, decodes one token for every running request, prefills the
newly admitted ones (in batches of similar prompt length; they join the running batch), samples, and
retires finished or cancelled requests (their cache rows are reused at once; the cache shrinks back when
long requests leave). ``generate`` is the offline helper.

Fault isolation: an error in one request's sampling or text handling fails that request only
(``finish_reason == "error"``); an error in the batched forward fails the requests of that batch and
frees the cache. ``step`` itself never raises for what a request holds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sapwood.errors import SapwoodError
from sapwood.infer.context import ContextPolicy
from sapwood.infer.kv_cache import KVBudget, default_kv_bytes
from sapwood.infer.request import Request, Status, StepOutput
from sapwood.infer.runner import ModelRunner
from sapwood.infer.sampling import (
    SamplingParams,
    TokenLogprobs,
    generation_config_defaults,
    sample_next_tokens,
    token_logprobs,
)
from sapwood.infer.scheduler import Scheduler, SchedulerConfig
from sapwood.infer.tokenizer import TextStream, TextTokenizer

if TYPE_CHECKING:
    from sapwood.infer.windowed import WindowedRequests

log = logging.getLogger("sapwood.infer")


class Engine:
    def __init__(
        self, model: torch.nn.Module, tokenizer: TextTokenizer | None = None,
        scheduler_config: SchedulerConfig | None = None,
    ):
        self.model = model.eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        config = scheduler_config or SchedulerConfig()
        parameter = next(model.parameters())
        budget_bytes = config.kv_memory_bytes or default_kv_bytes(parameter.device)
        budget = KVBudget.for_model(self.cfg, parameter.dtype, config.max_batch, budget_bytes)
        self.scheduler = Scheduler(config, budget)
        self.runner = ModelRunner(model, budget)
        self.policy = ContextPolicy(self.cfg, self.runner.device)
        self.eos_id = tokenizer.eos_id if tokenizer is not None else None
        self.eos_ids = tokenizer.eos_ids if tokenizer is not None else frozenset()
        self.sampling_defaults: dict[
            str, float | int
        ] = {}  # generation_config.json's, for unset request fields
        self.adapters: dict[str, str] = {}  # LoRA adapter name -> its folder (see load_adapter)
        self.tokens_generated = 0
        self.steps = 0
        self.failures = 0
        self._admitting: list[Request] = []
        self.windowed: WindowedRequests | None = None  # requests past max_context (see enable_window)

    @classmethod
    def from_folder(
        cls, folder: str | Path, scheduler_config: SchedulerConfig | None = None, device: str = "cpu",
        dtype: torch.dtype | None = None, need_tokenizer: bool = True,
    ) -> Engine:
        from sapwood.model.folder import load

        model = load(folder, device=device, dtype=dtype)
        tokenizer = None
        if need_tokenizer or (Path(folder) / "tokenizer.json").exists():
            tokenizer = TextTokenizer.from_folder(folder)
        engine = cls(model, tokenizer, scheduler_config)
        engine.sampling_defaults = generation_config_defaults(folder)
        return engine

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Serve the LoRA adapter in ``folder`` (PEFT format) on this engine's base model as ``name``;
        requests pick it by name and batches mix adapters (:func:`sapwood.model.lora.selecting`)."""
        from sapwood.model.lora import load_adapter

        if name in self.adapters:
            raise SapwoodError(f"adapter name {name!r} is given twice")
        load_adapter(self.model, folder, name)
        self.model.eval()
        self.adapters[name] = str(folder)

    def enable_window(self, sinks: int, window: int | None = None, max_requests: int = 4) -> None:
        """Serve requests past the maximum context through attention sinks + a sliding window."""
        from sapwood.infer.windowed import WindowedRequests

        self.windowed = WindowedRequests(self, sinks, window, max_requests)
        self.policy.overflow = True

    def _row_adapters(self, requests: list[Request]) -> list[str | None] | None:
        return [r.adapter for r in requests] if self.adapters else None

    # --- requests -------------------------------------------------------------------------------
    def make_request(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> Request:
        """A validated request (raises ContextLengthError past max_context, SapwoodError for token ids or
        sampling values this model cannot take, or an adapter it does not serve); not yet queued."""
        if adapter is not None and adapter not in self.adapters:
            raise SapwoodError(
                f"adapter {adapter!r} is not loaded; loaded: {', '.join(self.adapters) or 'none'}"
            )
        if self.windowed is None or not self.windowed.takes(len(prompt_ids), params):
            self.policy.check(len(prompt_ids), params.max_tokens)
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise SapwoodError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.top_k > vocab:
            raise SapwoodError(f"top_k={params.top_k}: must be in 0..{vocab} (the vocabulary size; 0 = off)")
        bad_bias = [t for t in params.logit_bias if t >= vocab]
        if bad_bias:
            raise SapwoodError(f"logit_bias token id {bad_bias[0]} is outside the vocabulary [0, {vocab})")
        request = Request(list(prompt_ids), params, self.policy.rope_for(len(prompt_ids) + params.max_tokens))
        request.adapter = adapter
        request.generator = params.make_generator()
        device = self.runner.device
        if params.repetition_penalty != 1.0:
            request.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            request.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        if params.logit_bias:
            request.bias = torch.zeros(vocab, dtype=torch.float32, device=device)
            request.bias[torch.tensor(list(params.logit_bias))] = torch.tensor(
                list(params.logit_bias.values())
            )
        if self.tokenizer is not None:
            request.stream = TextStream(self.tokenizer, params.stop)
        return request

    def add_request(self, request: Request) -> Request:
        """Queue a request (QueueFullError at the queue bound, KVBudgetError when it can never fit)."""
        if self.windowed is not None and self.windowed.takes(len(request.prompt_ids), request.params):
            return self.windowed.add(request)
        self.scheduler.add(request)
        return request

    def cancel(self, request: Request) -> None:
        """Mark a request cancelled; the next step retires it (safe from another thread)."""
        request.cancelled = True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or (self.windowed is not None and self.windowed.has_work)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the allocated cache positions holding live tokens."""
        cache = self.runner.cache
        allocated = cache.rows * cache.capacity
        return self.scheduler.live_tokens() / allocated if allocated else 0.0

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        try:
            return self._step()
        except Exception as exc:  # a failed forward: fail this batch, free the cache, keep serving
            return self._fail_batch(exc)
        finally:
            self._admitting = []
            self.steps += 1

    def _step(self) -> list[StepOutput]:
        scheduler, cache = self.scheduler, self.runner.cache
        schedule = scheduler.schedule()
        outputs: list[StepOutput] = []
        if schedule.cancelled:
            self._retire(schedule.cancelled, "cancelled")
            outputs += [StepOutput(r, [], "", True) for r in schedule.cancelled]
        running = list(scheduler.running)
        if running:
            logits = self.runner.decode(
                [r.output_ids[-1] for r in running], [r.length - 1 for r in running],
                [r.rope for r in running], self._row_adapters(running),
            )
            outputs += self.accept(running, logits)
        admitted = self._admitting = schedule.admitted
        if admitted:
            longest = max(scheduler.longest_running(), max(r.total_tokens for r in admitted))
            cache.fit(len(running) + len(admitted), longest, shrink=False)
            row = scheduler.start(admitted)
            parts, prompt_logits = [], []
            for group in schedule.prefill:  # batches of similar prompt length, in row order
                logits, scored = self.runner.prefill(
                    row, [r.prompt_ids for r in group], [r.rope for r in group],
                    [r.params.prompt_logprobs for r in group], self._row_adapters(group),
                )
                parts.append(logits)
                prompt_logits += scored
                row += len(group)
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
            for request, scored in zip(admitted, prompt_logits, strict=True):
                if scored is not None:
                    request.prompt_logprobs = token_logprobs(scored[:-1], request.prompt_ids[1:],
                                                             request.params.logprobs or 0)
            outputs += self.accept(admitted, logits)
        self._retire([o.request for o in outputs if o.finished and o.request.status is Status.RUNNING])
        cache.fit(scheduler.running_count, scheduler.longest_running())
        if self.windowed is not None:
            outputs += self.windowed.step()
        return outputs

    def _fail_batch(self, exc: Exception) -> list[StepOutput]:
        self.failures += 1
        log.exception(
            "inference step failed; failing the %d requests of the batch", self.scheduler.running_count
        )
        victims = list(self.scheduler.running) + [
            r for r in self._admitting if r.status is not Status.RUNNING
        ]
        self._retire(victims, "error")
        for request in victims:
            request.error = f"the inference step failed ({type(exc).__name__})"
        self.runner.cache.fit(0, 0)
        return [StepOutput(r, [], "", True) for r in victims]

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int | None]:
        """Batched sampling; if the batch fails, row by row so only the failing request is lost."""
        try:
            return sample_next_tokens(logits, [r.params for r in requests], [r.generator for r in requests],
                                      _stack([r.seen for r in requests], logits, torch.bool),
                                      _stack([r.bias for r in requests], logits, torch.float32)).tolist()
        except Exception:  # noqa: BLE001 - isolate the request that broke the batch
            tokens: list[int | None] = []
            for row, request in enumerate(requests):
                try:
                    tokens += self._sample([request], logits[row : row + 1]) if len(requests) > 1 else [None]
                except Exception:  # noqa: BLE001
                    tokens.append(None)
                if tokens[-1] is None:
                    log.exception("sampling failed for %s", request.request_id)
            return tokens

    def accept(self, requests: list[Request], logits: torch.Tensor) -> list[StepOutput]:
        """Each request's next token from its row of next-token ``logits`` ``[len(requests), vocab]``:
        sampled (batched), scored when the request asks for log-probabilities, then checked against EOS,
        ``max_tokens`` and the stop strings; one output per request, finished ones included. A request whose
        sampling or text handling fails is finished with ``finish_reason == "error"``, the others go on.
        Every way a request takes a token goes through here (the batched step and
        :mod:`sapwood.infer.windowed`)."""
        outputs = []
        live = [i for i, r in enumerate(requests) if r.params.max_tokens > 0]
        if len(live) < len(requests):  # echo with max_tokens 0: the prompt is scored, nothing generated
            for r in requests:
                if r.params.max_tokens == 0:
                    r.finish_reason = "length"
                    outputs.append(StepOutput(r, [], "", True))
            requests = [requests[i] for i in live]
            logits = logits[live]
            if not requests:
                return outputs
        tokens = self._sample(requests, logits)
        with_logprobs = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        scored: dict[int, TokenLogprobs] = {}
        if with_logprobs:
            picked = [i for i in with_logprobs if tokens[i] is not None]
            top = max(requests[i].params.logprobs for i in picked) if picked else 0
            values = token_logprobs(logits[picked], [tokens[i] for i in picked], top)
            scored = {i: (lp, alternatives[: requests[i].params.logprobs])
                      for i, (lp, alternatives) in zip(picked, values, strict=True)}
        now = time.perf_counter()
        for i, (request, token) in enumerate(zip(requests, tokens, strict=True)):
            if token is None:
                outputs.append(request.fail("sampling failed"))
                continue
            request.output_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            if request.seen is not None:
                request.seen[token] = True
            new_logprobs = []
            if i in scored:
                request.output_logprobs.append(scored[i])
                new_logprobs = [scored[i]]
            self.tokens_generated += 1
            try:
                output = self._finish_check(request, token)
            except Exception:  # noqa: BLE001 - fail this request only
                log.exception("text handling failed for %s", request.request_id)
                output = request.fail("text handling failed")
            output.new_logprobs = new_logprobs
            outputs.append(output)
        return outputs

    def _finish_check(self, request: Request, token: int) -> StepOutput:
        params = request.params
        reason = None
        if token in self.eos_ids and not params.ignore_eos:
            reason = "stop"
        elif len(request.output_ids) >= params.max_tokens:
            reason = "length"
        delta = ""
        if request.stream is not None:
            ids = request.output_ids[:-1] if reason == "stop" else request.output_ids
            delta = request.stream.push(ids, final=reason is not None)
            if request.stream.stopped:
                reason = "stop"
        request.finish_reason = reason
        return StepOutput(request, [token], delta, reason is not None)

    def _retire(self, finished: list[Request], reason: str | None = None) -> None:
        """Finish requests; the last running row moves into each freed row."""
        for source, target in self.scheduler.finish(finished, reason):
            self.runner.cache.move_slot(source, target)

    # --- offline use ----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[Request]:
        """Run ``prompts`` to completion (all submitted at once; prompt ``i`` through LoRA adapter
        ``adapters[i]`` when given) and return their finished requests."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapter_list = adapters if adapters is not None else [None] * len(prompts)
        requests = [self.add_request(self.make_request(p, sp, a))
                    for p, sp, a in zip(prompts, params_list, adapter_list, strict=True)]
        while self.has_work:
            self.step()
        return requests

    def generate_text(self, prompts: list[str], params: SamplingParams) -> list[str]:
        if self.tokenizer is None:
            raise SapwoodError("this engine has no tokenizer; pass token ids to generate()")
        requests = self.generate([self.tokenizer.encode(p) for p in prompts], params)
        return [r.stream.text for r in requests]


def _stack(rows: list[torch.Tensor | None], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-request ``[vocab]`` tensors stacked ``[batch, vocab]`` (zeros where None); None when all are."""
    if all(row is None for row in rows):
        return None
    zeros = torch.zeros(like.shape[-1], dtype=dtype, device=like.device)
    return torch.stack([row if row is not None else zeros for row in rows])
