"""Per-request context policy: how long a request may be and which rotary frequencies it gets.

The limit is ``model.max_context`` (prompt + new tokens); a longer request is refused with a
:class:`ContextLengthError` naming the limit. Rotary scaling follows the Hugging Face semantics of
``model.rope_scaling`` so served outputs match the trained and exported model: the static methods
(``linear``, ``ntk``, ``yarn``, ``llama3``) are part of the model's frequencies at every length;
``dynamic_ntk`` stretches theta per request by ``total_length / trained_context`` once a request runs past
the trained context, and leaves shorter requests on plain RoPE; ``longrope`` likewise gives a request that
will run past the trained context the long factors for all its positions, a shorter one the short factors.
With ``model.rope_policy: by_length`` (an adaptive window) a ``linear`` / ``ntk`` / ``yarn`` model gives a
request within the trained context plain RoPE and a longer one the method stretched by ``min(factor, length /
trained_context)``, so short requests keep their trained quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sapwood.config import ModelConfig, RopeScaling
from sapwood.errors import SapwoodError
from sapwood.model.rope import LENGTH_DEPENDENT, rope_cos_sin, scaled_inv_freq

# Static scalings a ``rope_policy: by_length`` model applies per request, stretched to the request's length.
BY_LENGTH = ("linear", "ntk", "yarn")


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
        inv_freq, factor = scaled_inv_freq(
            cfg.head_dim, cfg.rope_theta, cfg.trained_context, cfg.rope_scaling
        )
        self.default = RopePlan(inv_freq.to(device), factor)
        self.device = device
        self._dynamic: dict[int, RopePlan] = {}
        self.overflow = False  # True: requests past max_context are served through a sink + window cache

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens < 1:
            raise ContextLengthError("the prompt is empty; give at least one token")
        total = prompt_tokens + max_tokens
        if total > self.max_context:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_context} tokens; the request needs "
                f"{total} ({prompt_tokens} in the prompt, {max_tokens} for the completion); shorten the "
                "prompt or max_tokens"
            )

    def default_max_tokens(self, prompt_tokens: int, wanted: int) -> int:
        """``wanted`` clipped to the room left after the prompt (at least 1); ``wanted`` with ``overflow``."""
        if self.overflow:
            return wanted
        return max(1, min(wanted, self.max_context - prompt_tokens))

    def rope_for(self, total_tokens: int) -> RopePlan:
        """The rotary frequencies for a request that will reach ``total_tokens`` positions (at most
        ``max_context``: a longer, windowed request never has more positions)."""
        total_tokens = min(total_tokens, self.max_context)
        scaling = self.cfg.rope_scaling
        if self.cfg.rope_policy == "by_length" and scaling.type in BY_LENGTH:
            return self._by_length(total_tokens)
        if scaling.type not in LENGTH_DEPENDENT or total_tokens <= self.trained_context:
            return self.default
        plan = self._dynamic.get(total_tokens)
        if plan is None:
            inv_freq, factor = scaled_inv_freq(
                self.cfg.head_dim, self.cfg.rope_theta, self.trained_context, scaling, seq_len=total_tokens
            )
            plan = self._dynamic[total_tokens] = RopePlan(inv_freq.to(self.device), factor)
        return plan

    def _by_length(self, total_tokens: int) -> RopePlan:
        key = max(total_tokens, self.trained_context)  # every request within the trained context: plain RoPE
        plan = self._dynamic.get(key)
        if plan is None:
            plan = self._dynamic[key] = _by_length_plan(self.cfg, key, self.device)
        return plan


def _by_length_plan(cfg: ModelConfig, total_tokens: int, device: str | torch.device) -> RopePlan:
    """``rope_policy: by_length``: plain RoPE within the trained context; past it the configured method
    stretched only as far as the request needs, ``min(factor, total_tokens / trained_context)``."""
    factor = min(cfg.rope_scaling.factor, max(1.0, total_tokens / cfg.trained_context))
    scaling = cfg.rope_scaling if factor > 1.0 else RopeScaling()
    inv_freq, attention = scaled_inv_freq(
        cfg.head_dim, cfg.rope_theta, cfg.trained_context, scaling.model_copy(update={"factor": factor})
    )
    return RopePlan(inv_freq.to(device), attention)


def rope_tables(positions: torch.Tensor, plans: list[RopePlan]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[batch, seq, head_dim]`` for ``positions`` ``[batch, seq]``, one plan per row."""
    first = plans[0]
    if all(plan is first for plan in plans):
        return rope_cos_sin(positions, first.inv_freq, first.attention_factor)
    inv_freq = torch.stack([plan.inv_freq for plan in plans])[:, None, :]
    factor = torch.tensor([plan.attention_factor for plan in plans], device=positions.device)[:, None, None]
    return rope_cos_sin(positions, inv_freq, factor)
