"""The model runner executes what the scheduler decided: batched prefill and batched decode on the
decoder, reading and writing the :class:`SlotKVCache`. It returns next-token logits, one row per request.

It walks the decoder's own modules (embedding, blocks, norm, head) so that it can give each row its own
rotary table (per-request context) and apply the head only at the positions that are sampled.
"""

from __future__ import annotations

import torch

from sapwood.infer.context import RopePlan, rope_tables
from sapwood.infer.kv_cache import SlotKVCache


class ModelRunner:
    def __init__(self, model: torch.nn.Module, max_batch: int, max_capacity: int):
        self.model = model
        cfg = model.cfg
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.cache = SlotKVCache(
            cfg.layers, max_batch, cfg.kv_heads, cfg.head_dim, max_capacity, self.dtype, self.device
        )

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, plans: list[RopePlan], last_index: torch.Tensor
    ) -> torch.Tensor:
        model = self.model
        hidden = model.tok_embeddings(tokens)
        cos, sin = rope_tables(positions, plans)
        for name, block in model.layers.items():
            hidden = block(hidden, cos, sin, self.cache, int(name))
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        hidden = model.norm(hidden[rows, last_index][:, None, :])
        return model.output(hidden)[:, 0, :]

    @torch.inference_mode()
    def prefill(self, first_row: int, prompts: list[list[int]], plans: list[RopePlan]) -> torch.Tensor:
        """Run the prompts (right-padded to the longest) into rows ``first_row..``; logits ``[batch, vocab]``."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        positions = torch.arange(width, device=self.device)[None, :].expand(len(prompts), width)
        self.cache.begin_prefill(first_row, len(prompts), width)
        return self._forward(tokens, positions, plans, lengths - 1)

    @torch.inference_mode()
    def decode(self, last_tokens: list[int], positions: list[int], plans: list[RopePlan]) -> torch.Tensor:
        """One token for each of rows ``0..n-1`` at its own position; logits ``[n, vocab]``."""
        tokens = torch.tensor(last_tokens, dtype=torch.long, device=self.device)[:, None]
        position_tensor = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.cache.begin_decode(position_tensor)
        return self._forward(tokens, position_tensor[:, None], plans, torch.zeros_like(position_tensor))
