"""The engine: continuous batching of many requests over one model.

``step()`` asks the scheduler what to run, decodes one token for every running request, prefills the
newly admitted ones (they join the running batch), samples per request, and retires finished or
cancelled requests (their cache rows are reused at once). ``generate`` is the offline helper.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sapwood.infer.context import ContextPolicy
from sapwood.infer.request import Request, Status, StepOutput
from sapwood.infer.runner import ModelRunner
from sapwood.infer.sampling import SamplingParams, generation_config_defaults, sample_next_tokens
from sapwood.infer.scheduler import Scheduler, SchedulerConfig
from sapwood.infer.tokenizer import TextStream, TextTokenizer


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer | None = None,
        scheduler_config: SchedulerConfig | None = None,
    ):
        self.model = model.eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig())
        sched = self.scheduler.config
        self.runner = ModelRunner(model, sched.max_batch, self.cfg.max_context)
        self.policy = ContextPolicy(self.cfg, self.runner.device)
        self.eos_id = tokenizer.eos_id if tokenizer is not None else None
        self.eos_ids = tokenizer.eos_ids if tokenizer is not None else frozenset()
        self.sampling_defaults: dict[str, float | int] = {}  # generation_config.json's, for unset request fields
        self.tokens_generated = 0
        self.steps = 0

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        scheduler_config: SchedulerConfig | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        need_tokenizer: bool = True,
    ) -> Engine:
        from sapwood.model.folder import load

        model = load(folder, device=device, dtype=dtype)
        tokenizer = None
        if need_tokenizer or (Path(folder) / "tokenizer.json").exists():
            tokenizer = TextTokenizer.from_folder(folder)
        engine = cls(model, tokenizer, scheduler_config)
        engine.sampling_defaults = generation_config_defaults(folder)
        return engine

    # --- requests -------------------------------------------------------------------------------
    def make_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """A validated request (raises ContextLengthError past max_context); not yet queued."""
        self.policy.check(len(prompt_ids), params.max_tokens)
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            from sapwood.errors import SapwoodError

            raise SapwoodError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        request = Request(list(prompt_ids), params, self.policy.rope_for(len(prompt_ids) + params.max_tokens))
        request.generator = params.make_generator()
        if params.repetition_penalty != 1.0:
            request.seen = torch.zeros(vocab, dtype=torch.bool, device=self.runner.device)
            request.seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        if self.tokenizer is not None:
            request.stream = TextStream(self.tokenizer, params.stop)
        return request

    def add_request(self, request: Request) -> Request:
        self.scheduler.add(request)
        return request

    def cancel(self, request: Request) -> None:
        """Mark a request cancelled; the next step retires it (safe from another thread)."""
        request.cancelled = True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the allocated cache positions holding live tokens."""
        cache = self.runner.cache
        used = sum(r.length for r in self.scheduler.running)
        return used / (cache.slots * cache.capacity) if cache.capacity else 0.0

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        schedule = self.scheduler.schedule()
        outputs: list[StepOutput] = []
        for request in schedule.cancelled:
            request.finish_reason = "cancelled"
        self._retire(schedule.cancelled)
        outputs += [StepOutput(r, [], "", True) for r in schedule.cancelled if r.status is Status.FINISHED]
        running = self.scheduler.running
        if running:
            logits = self.runner.decode(
                [r.output_ids[-1] for r in running], [r.length - 1 for r in running], [r.rope for r in running]
            )
            outputs += self._accept(running, logits)
        admitted = schedule.admitted
        if admitted:
            self.runner.cache.reserve(max(r.total_tokens for r in running + admitted))
            logits = self.runner.prefill(len(running), [r.prompt_ids for r in admitted], [r.rope for r in admitted])
            running.extend(admitted)
            outputs += self._accept(admitted, logits)
        self._retire([o.request for o in outputs if o.finished and o.request.status is Status.RUNNING])
        self.steps += 1
        return outputs

    def _accept(self, requests: list[Request], logits: torch.Tensor) -> list[StepOutput]:
        seen = None
        if any(r.seen is not None for r in requests):
            seen = torch.stack([
                r.seen if r.seen is not None else torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                for r in requests
            ])
        tokens = sample_next_tokens(logits, [r.params for r in requests], [r.generator for r in requests], seen)
        now = time.perf_counter()
        outputs = []
        for request, token in zip(requests, tokens.tolist(), strict=True):
            request.output_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            if request.seen is not None:
                request.seen[token] = True
            self.tokens_generated += 1
            outputs.append(self._finish_check(request, token))
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

    def _retire(self, finished: list[Request]) -> None:
        """Remove finished requests; the last running row moves into each freed row."""
        running = self.scheduler.running
        for request in finished:
            request.status = Status.FINISHED
            if request not in running:
                continue
            row = running.index(request)
            last = len(running) - 1
            if row != last:
                self.runner.cache.move_slot(last, row)
                running[row] = running[last]
            running.pop()

    # --- offline use ----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run ``prompts`` to completion (all submitted at once) and return their finished requests."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        requests = [self.add_request(self.make_request(p, sp)) for p, sp in zip(prompts, params_list, strict=True)]
        while self.has_work:
            self.step()
        return requests

    def generate_text(self, prompts: list[str], params: SamplingParams) -> list[str]:
        if self.tokenizer is None:
            from sapwood.errors import SapwoodError

            raise SapwoodError("this engine has no tokenizer; pass token ids to generate()")
        requests = self.generate([self.tokenizer.encode(p) for p in prompts], params)
        return [r.stream.text for r in requests]
