"""Per-request context policy: how long a request may be and which rotary frequencies it gets.

The limit is ``model.max_context`` (prompt + new tokens); a longer request is refused with a
:class:`ContextLengthError` naming the limit. Rotary scaling follows the Hugging Face semantics of
``model.rope_scaling`` so served outputs match the trained and exported model: the static methods
(``linear``, ``ntk``, ``yarn``, ``llama3``) are part of the model's frequencies at every length; ``dynamic_ntk``
stretches theta per request by ``total_length / trained_context`` once a request runs past the trained
context, and leaves shorter requests on plain RoPE; ``longrope`` likewise gives a request that will run
past the trained context the long factors for all its positions, a shorter one the short factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sapwood.config import ModelConfig
from sapwood.errors import SapwoodError
from sapwood.model.rope import LENGTH_DEPENDENT, scaled_inv_freq


class ContextLengthError(SapwoodError):
    """A request needs more positions than the model serves."""


@dataclass(frozen=True)
class RopePlan:
    inv_freq: torch.Tensor  # float32 [head_dim // 2]
    attention_factor: float


class ContextPolicy:
    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.max_context = cfg.max_context
        self.trained_context = cfg.trained_context
        inv_freq, factor = scaled_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.trained_context, cfg.rope_scaling)
        self.default = RopePlan(inv_freq.to(device), factor)
        self.device = device
        self._dynamic: dict[int, RopePlan] = {}

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens < 1:
            raise ContextLengthError("the prompt is empty; give at least one token")
        total = prompt_tokens + max_tokens
        if total > self.max_context:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_context} tokens; the request needs {total} "
                f"({prompt_tokens} in the prompt, {max_tokens} for the completion); shorten the prompt or max_tokens"
            )

    def default_max_tokens(self, prompt_tokens: int, wanted: int) -> int:
        """``wanted`` clipped to the room left after the prompt (at least 1)."""
        return max(1, min(wanted, self.max_context - prompt_tokens))

    def rope_for(self, total_tokens: int) -> RopePlan:
        """The rotary frequencies for a request that will reach ``total_tokens`` positions."""
        scaling = self.cfg.rope_scaling
        if scaling.type not in LENGTH_DEPENDENT or total_tokens <= self.trained_context:
            return self.default
        plan = self._dynamic.get(total_tokens)
        if plan is None:
            inv_freq, factor = scaled_inv_freq(
                self.cfg.head_dim, self.cfg.rope_theta, self.trained_context, scaling, seq_len=total_tokens
            )
            plan = self._dynamic[total_tokens] = RopePlan(inv_freq.to(self.device), factor)
        return plan


def rope_tables(
    positions: torch.Tensor, plans: list[RopePlan]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[batch or 1, seq, head_dim]`` for ``positions`` ``[batch, seq]``, one plan per row."""
    if all(plan is plans[0] for plan in plans):
        inv_freq = plans[0].inv_freq[None, None, :]
        factor: torch.Tensor | float = plans[0].attention_factor
    else:
        inv_freq = torch.stack([plan.inv_freq for plan in plans])[:, None, :]
        factor = torch.tensor([plan.attention_factor for plan in plans], device=positions.device)[:, None, None]
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * factor, angles.sin() * factor
