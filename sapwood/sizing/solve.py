"""The config solver (``sapwood solve``): the valid shape nearest a target parameter count."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sapwood.config import FAMILY_OPTIONS, ModelConfig
from sapwood.errors import ConfigError


@dataclass(frozen=True)
class SolveRequest:
    """A target parameter count and the dimensions to hold fixed (None = free).

    Free dimensions are searched: ``hidden`` over ``heads x head_dim`` with head_dim a multiple of 8
    (or ``head_dim`` when given; 128 when heads are free too), ``layers`` over 1..256, ``ffn`` solved in
    closed form and rounded to a multiple of 64, ``kv_heads`` = heads when free (no GQA).
    """

    params: float
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    hidden: int | None = None
    ffn: int | None = None
    head_dim: int | None = None
    vocab_size: int = 32000
    tied_embeddings: bool = False
    tolerance: float = 5e-4
    ffn_ratio: float = 8 / 3
    near_hidden: int | None = None
    aspect: float = 128.0
    family: str = "llama"  # a key of FAMILY_OPTIONS: its biases / q-k norms are counted and set


@dataclass(frozen=True)
class SolveResult:
    model: ModelConfig
    params: int
    error: float
    alternatives: list[tuple[int, ModelConfig]]


def _shape_cost(req: SolveRequest, layers: int, hidden: int, ffn: int) -> float:
    """How far a shape is from the preferences: ffn/hidden near ``ffn_ratio`` (Llama's 8/3), hidden near
    ``near_hidden`` when given, hidden/layers near ``aspect`` when layers are free (Llama 7B/13B: 128)."""
    cost = abs(math.log(ffn / hidden / req.ffn_ratio))
    if req.near_hidden:
        cost += abs(math.log(hidden / req.near_hidden))
    if req.layers is None:
        cost += abs(math.log(hidden / layers / req.aspect))
    return cost


def _check_request(req: SolveRequest) -> None:
    for name in ("layers", "heads", "kv_heads", "hidden", "ffn", "head_dim", "vocab_size", "near_hidden"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value} must be a positive integer")
    if req.params <= 0:
        raise ConfigError(f"params={req.params:g} must be positive")
    if req.family not in FAMILY_OPTIONS:
        raise ConfigError(f"family={req.family!r} is not known; allowed: {', '.join(FAMILY_OPTIONS)}")
    if req.ffn is not None and req.ffn % 64:
        raise ConfigError(
            f"ffn={req.ffn} is not a multiple of 64; choose one (e.g. {round(req.ffn / 64) * 64 or 64})"
        )
    if req.head_dim is not None and req.head_dim % 8:
        raise ConfigError(f"head_dim={req.head_dim} is not a multiple of 8")
    if req.heads and req.kv_heads and req.heads % req.kv_heads:
        raise ConfigError(
            f"heads={req.heads} is not divisible by kv_heads={req.kv_heads}; kv_heads must divide heads"
        )
    if req.hidden and req.heads and not _decoupled_head_dim(req):
        head_dim = req.hidden / req.heads
        if req.hidden % req.heads or head_dim % 8 or (req.head_dim and head_dim != req.head_dim):
            step = req.heads * 8
            below, above = max(step, req.hidden // step * step), (req.hidden // step + 1) * step
            raise ConfigError(
                f"hidden={req.hidden} with heads={req.heads} gives head_dim={head_dim:g}, not a multiple "
                f"of 8; nearest valid hidden: {below} or {above}"
            )


def _decoupled_head_dim(req: SolveRequest) -> bool:
    """Qwen3's shape rule: head_dim (128) is independent of hidden / heads when all three are given."""
    return req.family == "qwen3" and bool(req.hidden and req.heads and req.head_dim)


def _candidate_dims(req: SolveRequest) -> list[tuple[int, int, int]]:
    """(hidden, heads, kv_heads) combinations to try."""
    if _decoupled_head_dim(req):
        return [(req.hidden, req.heads, req.kv_heads or req.heads)]
    combos = []
    if req.heads is not None:
        head_dims = (
            [req.hidden // req.heads]
            if req.hidden
            else ([req.head_dim] if req.head_dim else range(8, 1025, 8))
        )
        for head_dim in head_dims:
            combos.append((req.heads * head_dim, req.heads, req.kv_heads or req.heads))
        return combos
    head_dim = req.head_dim or 128
    hiddens = [req.hidden] if req.hidden else [head_dim * k for k in range(1, 257)]
    for hidden in hiddens:
        if hidden % head_dim:
            raise ConfigError(
                f"hidden={hidden} is not a multiple of head_dim={head_dim}; give --heads or --head-dim"
            )
        heads = hidden // head_dim
        if req.kv_heads and heads % req.kv_heads:
            continue
        combos.append((hidden, heads, req.kv_heads or heads))
    return combos


def solve(req: SolveRequest) -> SolveResult:
    """The valid config nearest to ``req.params``: among shapes within ``tolerance`` (relative) of the
    target, the one closest to the shape preferences; refuses (ConfigError) when none is that close."""
    _check_request(req)
    found: list[tuple[float, int, dict[str, Any]]] = []
    nearest: tuple[float, int] | None = None
    embedding_copies = 1 if req.tied_embeddings else 2
    options = FAMILY_OPTIONS[req.family]
    for hidden, heads, kv_heads in _candidate_dims(req):
        head_dim = req.head_dim if _decoupled_head_dim(req) else hidden // heads
        attention = 2 * hidden + hidden * 2 * head_dim * (heads + kv_heads)  # norms + q, k, v, o per layer
        attention += head_dim * (heads + 2 * kv_heads) * options.get("qkv_bias", False)
        attention += 2 * head_dim * options.get("qk_norm", False)
        for layers in [req.layers] if req.layers else range(1, 257):
            without_ffn = req.vocab_size * hidden * embedding_copies + layers * attention + hidden
            per_unit = 3 * hidden * layers  # params added by one more ffn unit in every layer
            if req.ffn:
                ffns = [req.ffn]
            else:
                units = (req.params - without_ffn) / per_unit / 64
                ffns = sorted({max(1, math.floor(units)) * 64, max(1, math.ceil(units)) * 64})
            for ffn in ffns:
                total = without_ffn + per_unit * ffn
                error = abs(total - req.params) / req.params
                if nearest is None or error < nearest[0]:
                    nearest = (error, total)
                if error <= req.tolerance:
                    dims = dict(
                        vocab_size=req.vocab_size, hidden=hidden, layers=layers, heads=heads,
                        kv_heads=kv_heads, head_dim=head_dim, ffn=ffn, tied_embeddings=req.tied_embeddings,
                        **options,
                    )
                    found.append((_shape_cost(req, layers, hidden, ffn), total, dims))
    if not found:
        best = (
            f"; the nearest valid shape has {nearest[1]:,} params ({nearest[0]:.2%} off)" if nearest else ""
        )
        raise ConfigError(
            f"params={req.params:g}: no valid config within tolerance={req.tolerance:g} with the fixed "
            f"dimensions{best}; free a dimension or raise --tolerance"
        )
    found.sort(key=lambda item: (item[0], abs(item[1] - req.params)))
    (_, total, dims), others = found[0], found[1:6]
    return SolveResult(ModelConfig(**dims), total, (total - req.params) / req.params,
                       [(t, ModelConfig(**d)) for _, t, d in others])
