"""Rotary position embeddings (rotate-half convention, as in Llama) and their long-context scalings.

Frequencies follow the Hugging Face reference formulas so exported checkpoints behave the same there.
cos/sin are computed from explicit positions on the fly: no table of max_context rows is stored,
so a 2M-token context costs nothing until it is used.
"""

from __future__ import annotations

import math

import torch

from sapwood.config import RopeScaling


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def yarn_attention_factor(factor: float) -> float:
    """YaRN's attention temperature: 0.1 * ln(s) + 1 (1.0 when not stretching)."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def scaled_inv_freq(
    head_dim: int, theta: float, trained_context: int, scaling: RopeScaling, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, ``[head_dim // 2]``) and the attention factor for ``scaling``.

    ``seq_len`` matters only for ``dynamic_ntk``: the stretch factor is ``seq_len / trained_context``
    (at least 1, at most ``scaling.factor``).
    """
    kind, factor = scaling.type, scaling.factor
    inv_freq = base_inv_freq(head_dim, theta)
    attention_factor = 1.0
    if kind == "none" or factor == 1.0 and kind != "dynamic_ntk":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / factor
    elif kind in ("ntk", "dynamic_ntk"):
        if kind == "dynamic_ntk":
            factor = min(max(1.0, (seq_len or trained_context) / trained_context), factor)
        if factor > 1.0:
            stretched_theta = theta * factor ** (head_dim / (head_dim - 2))
            inv_freq = base_inv_freq(head_dim, stretched_theta)
    elif kind == "yarn":
        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(trained_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
        high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation_weight = 1.0 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
        attention_factor = yarn_attention_factor(factor)
    return inv_freq.float(), attention_factor


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape ``[*positions.shape, head_dim]`` in float32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[batch, heads, seq, head_dim]``; cos/sin are ``[batch or 1, seq, head_dim]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)
