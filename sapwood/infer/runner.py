"""The model runner executes what the scheduler decided: batched prefill and batched decode through the
model's own forward, reading and writing the :class:`SlotKVCache`. It gives each row its own rotary
table (per-request context) and asks the model for logits only at the positions that are sampled or
scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from sapwood.infer.context import RopePlan, rope_tables
from sapwood.infer.kv_cache import KVBudget, SlotKVCache


class ModelRunner:
    def __init__(self, model: torch.nn.Module, budget: KVBudget):
        self.model = model
        cfg = model.cfg
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.cache = SlotKVCache(cfg.layers, cfg.kv_heads, cfg.head_dim, budget, self.dtype, self.device)

    def adapters_of_rows(self, adapters: Sequence[str | None] | None):
        """Row ``i`` through LoRA adapter ``adapters[i]`` (None: the base) for one forward; no-op without."""
        if not adapters:
            return contextlib.nullcontext()
        from sapwood.model.lora import selecting

        return selecting(self.model, adapters)

    @torch.inference_mode()
    def prefill(
        self, first_row: int, prompts: list[list[int]], plans: list[RopePlan], score_prompt: list[bool],
        adapters: Sequence[str | None] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Run the prompts (right-padded to the longest) into rows ``first_row..`` (row ``i`` through LoRA
        adapter ``adapters[i]`` when given).

        Returns the next-token logits ``[batch, vocab]`` and, for each row with ``score_prompt``, the
        logits at every prompt position ``[len, vocab]`` (None for the others)."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        flat = torch.tensor([t for p in prompts for t in p + [0] * (width - len(p))], dtype=torch.long)
        tokens = flat.view(len(prompts), width).to(self.device)
        positions = torch.arange(width, device=self.device)[None, :].expand(len(prompts), width)
        at: list[int] = []
        spans: list[tuple[int, int] | None] = []
        last: list[int] = []
        for row, (length, score) in enumerate(zip(lengths, score_prompt, strict=True)):
            start = len(at)
            at.extend(range(row * width, row * width + length) if score else [row * width + length - 1])
            spans.append((start, len(at)) if score else None)
            last.append(len(at) - 1)
        self.cache.begin_prefill(first_row, len(prompts), width)
        with self.adapters_of_rows(adapters):
            logits = self.model(
                tokens, kv_cache=self.cache, rope=rope_tables(positions, plans),
                logits_at=torch.tensor(at, device=self.device),
            )
        if not any(score_prompt):
            return logits, [None] * len(prompts)
        return logits[last], [logits[span[0] : span[1]] if span else None for span in spans]

    @torch.inference_mode()
    def decode(
        self, last_tokens: list[int], positions: list[int], plans: list[RopePlan],
        adapters: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """One token for each of rows ``0..n-1`` at its own position (and LoRA adapter); logits ``[n,
        vocab]``."""
        tokens = torch.tensor(last_tokens, dtype=torch.long).to(self.device)[:, None]
        position_tensor = torch.tensor(positions, dtype=torch.long).to(self.device)
        highest = max(positions)
        self.cache.begin_decode(position_tensor, highest + 1, uniform=highest == min(positions))
        with self.adapters_of_rows(adapters):
            return self.model(
                tokens, kv_cache=self.cache, rope=rope_tables(position_tensor[:, None], plans),
                logits_at=torch.arange(len(last_tokens), device=self.device),
            )
