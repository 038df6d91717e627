"""Rotary position embeddings (rotate-half convention, as in Llama) and their long-context scalings
(linear, NTK, dynamic NTK, YaRN, Llama 3's llama3 and Phi-3's longrope).

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


# Scalings whose frequencies depend on how long the sequence (or the request) gets.
LENGTH_DEPENDENT = ("dynamic_ntk", "longrope")


def longrope_attention_factor(scaling: RopeScaling, trained_context: int) -> float:
    """LongRoPE's cos/sin scale: ``attention_factor`` when given, else sqrt(1 + ln(factor) / ln(trained))."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(scaling.factor) / math.log(trained_context))


def llama3_inv_freq(inv_freq: torch.Tensor, trained_context: int, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than ``trained / low_freq_factor`` divided by ``factor``, shorter than
    ``trained / high_freq_factor`` kept, and a linear ramp in ``trained / wavelength`` between the two."""
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    smooth = ((trained_context / wavelength - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq


def scaled_inv_freq(
    head_dim: int, theta: float, trained_context: int, scaling: RopeScaling, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, ``[head_dim // 2]``) and the attention factor for ``scaling``.

    ``seq_len`` matters only for the :data:`LENGTH_DEPENDENT` scalings: for ``dynamic_ntk`` the stretch
    factor is ``seq_len / trained_context`` (at least 1, at most ``scaling.factor``); ``longrope`` uses
    ``long_factor`` once ``seq_len`` passes ``trained_context``, ``short_factor`` otherwise.
    """
    kind, factor = scaling.type, scaling.factor
    inv_freq = base_inv_freq(head_dim, theta)
    attention_factor = 1.0
    if kind == "longrope":
        long = seq_len is not None and seq_len > trained_context
        divisors = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float64)
        return (inv_freq / divisors).float(), longrope_attention_factor(scaling, trained_context)
    if kind == "none" or factor == 1.0 and kind != "dynamic_ntk":
        pass
    elif kind == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, trained_context, scaling)
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
        attention_factor = scaling.attention_factor or yarn_attention_factor(factor)
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
    """Rotate ``x`` of shape ``[batch, heads, seq, head_dim]``; cos/sin are ``[batch or 1, seq,
    head_dim]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)
