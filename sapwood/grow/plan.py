"""A growth request (target shape), its validation against caps, and applying it to a model + optimizer.

Operators run in a fixed order: heads, FFN width, hidden width, then depth, so new blocks are built
at the final width. Optimizer surgery follows each operator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sapwood.config import GrowthAmounts, GrowthCaps, ModelConfig
from sapwood.errors import SapwoodError
from sapwood.grow.operators import (
    DepthInit,
    ParamChange,
    grow_depth,
    grow_ffn,
    grow_heads,
    grow_hidden,
)
from sapwood.grow.optimizer import apply_changes_to_optimizer
from sapwood.model.transformer import Decoder

SHAPE_FIELDS = ("layers", "hidden", "ffn", "heads", "kv_heads")


@dataclass
class GrowthRequest:
    """The shape to grow to (None = keep) and how new blocks are made."""

    layers: int | None = None
    hidden: int | None = None
    ffn: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    layer_position: Any = "evenly"
    depth_init: DepthInit = "identity"
    function_preserving: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def target(self, cfg: ModelConfig) -> dict[str, int]:
        """The full target shape; with only ``heads`` given, kv_heads keeps the query heads per kv head."""
        shape = {
            name: getattr(self, name) if getattr(self, name) is not None else getattr(cfg, name)
            for name in SHAPE_FIELDS
        }
        if self.heads is not None and self.kv_heads is None:
            if self.heads % cfg.kv_groups:
                raise SapwoodError(
                    f"heads={self.heads} is not a multiple of the {cfg.kv_groups} query heads per kv head; "
                    f"pass kv_heads or choose a multiple of {cfg.kv_groups}"
                )
            shape["kv_heads"] = self.heads // cfg.kv_groups
        return shape


def shape_of(cfg: ModelConfig) -> dict[str, int]:
    return {name: getattr(cfg, name) for name in SHAPE_FIELDS} | {"head_dim": cfg.head_dim}


def request_from_amounts(cfg: ModelConfig, amounts: GrowthAmounts) -> GrowthRequest:
    """The request for one event adding ``amounts`` (heads added keep the group size unless kv_heads is
    set)."""
    heads = cfg.heads + amounts.heads
    kv_heads = cfg.kv_heads + amounts.kv_heads
    if amounts.heads and not amounts.kv_heads:
        kv_heads = cfg.kv_heads
    return GrowthRequest(
        layers=cfg.layers + amounts.layers, hidden=cfg.hidden + amounts.hidden, ffn=cfg.ffn + amounts.ffn,
        heads=heads, kv_heads=kv_heads, layer_position=amounts.layer_position, depth_init=amounts.depth_init,
    )


def request_towards(cfg: ModelConfig, target: ModelConfig) -> GrowthRequest:
    """The request growing ``cfg`` into ``target``; every non-shape field must already agree."""
    for name in ("vocab_size", "tied_embeddings", "rope_theta", "trained_context", "head_dim"):
        if getattr(cfg, name) != getattr(target, name):
            raise SapwoodError(
                f"target {name}={getattr(target, name)!r} differs from the checkpoint's "
                f"{getattr(cfg, name)!r}; "
                "growth changes only layers, hidden, ffn, heads and kv_heads"
            )
    return GrowthRequest(**{name: getattr(target, name) for name in SHAPE_FIELDS})


def params_of_shape(cfg: ModelConfig) -> int:
    """Exact parameter count of a decoder of this shape."""
    attention = cfg.hidden * cfg.head_dim * (2 * cfg.heads + 2 * cfg.kv_heads)
    block = attention + 3 * cfg.hidden * cfg.ffn + 2 * cfg.hidden
    head = 0 if cfg.tied_embeddings else cfg.vocab_size * cfg.hidden
    return cfg.vocab_size * cfg.hidden + cfg.layers * block + cfg.hidden + head


def target_config(cfg: ModelConfig, request: GrowthRequest) -> ModelConfig:
    """The model config after ``request`` (validated; one-line error if it shrinks or breaks GQA)."""
    target = request.target(cfg)
    biases = [name for name in ("qkv_bias", "attention_out_bias", "mlp_bias") if getattr(cfg, name, False)]
    widened = [name for name in ("hidden", "ffn", "heads", "kv_heads") if target[name] != getattr(cfg, name)]
    if biases and widened:
        raise SapwoodError(
            f"{widened[0]}={target[widened[0]]}: width growth of a model with {biases[0]}=true is not "
            "supported (the operators grow weights, not biases); grow layers only"
        )
    for name, value in target.items():
        if value < getattr(cfg, name):
            raise SapwoodError(
                f"{name}={value} is smaller than the current {getattr(cfg, name)}; growth can only add "
                f"(use >= {getattr(cfg, name)})"
            )
    if target["heads"] % target["kv_heads"]:
        raise SapwoodError(
            f"heads={target['heads']} is not divisible by kv_heads={target['kv_heads']}; "
            "kv_heads must divide heads"
        )
    if target["heads"] // target["kv_heads"] < cfg.kv_groups:
        raise SapwoodError(
            f"heads={target['heads']} with kv_heads={target['kv_heads']} gives "
            f"{target['heads'] // target['kv_heads']} query heads per kv head, fewer than the current "
            f"{cfg.kv_groups}; growth keeps each query head with its kv head"
        )
    data = cfg.model_dump() | target | {"head_dim": cfg.head_dim}
    if request.function_preserving and target["hidden"] > cfg.hidden:
        data["norm_eps"] = cfg.norm_eps * (cfg.hidden / target["hidden"])  # as grow_hidden rescales it
    return ModelConfig.model_validate(data)


def cap_violation(cfg: ModelConfig, caps: GrowthCaps) -> str | None:
    """Why ``cfg`` breaks ``caps`` (one line), or None when it fits."""
    for name, cap in (
        ("layers", caps.max_layers), ("hidden", caps.max_hidden), ("ffn", caps.max_ffn),
        ("heads", caps.max_heads),
    ):
        if cap is not None and getattr(cfg, name) > cap:
            return f"{name}={getattr(cfg, name)} exceeds the cap max_{name}={cap}"
    if caps.max_params is not None:
        params = params_of_shape(cfg)
        if params > caps.max_params:
            return f"the grown model has {params:,} parameters, above the cap max_params={caps.max_params:,}"
    if caps.memory_budget_gb is not None:
        needed = training_memory_gb(cfg)
        if needed > caps.memory_budget_gb:
            return (
                f"the grown model needs {needed:.3g} GB of training memory, above "
                f"memory_budget_gb={caps.memory_budget_gb:g}"
            )
    return None


def training_memory_gb(cfg: ModelConfig, bytes_per_param: int = 16) -> float:
    """Training-state memory of the model (fp32 weights, grads, AdamW moments), from sapwood.sizing when
    available."""
    try:
        from sapwood import sizing  # noqa: PLC0415 - optional until the sizing module lands
    except ImportError:
        sizing = None
    if sizing is not None and hasattr(sizing, "training_memory_bytes"):
        return sizing.training_memory_bytes(cfg) / 1e9
    return params_of_shape(cfg) * bytes_per_param / 1e9


def clip_to_caps(cfg: ModelConfig, request: GrowthRequest, caps: GrowthCaps) -> GrowthRequest:
    """The request with each dimension limited by the per-dimension caps (used by triggers)."""
    clipped = GrowthRequest(**{k: v for k, v in request.__dict__.items()})
    for name, cap in (("layers", caps.max_layers), ("hidden", caps.max_hidden), ("ffn", caps.max_ffn)):
        value = getattr(clipped, name)
        if cap is not None and value is not None and value > cap:
            setattr(clipped, name, max(cap, getattr(cfg, name)))
    if caps.max_heads is not None and clipped.heads is not None and clipped.heads > caps.max_heads:
        clipped.heads, clipped.kv_heads = cfg.heads, cfg.kv_heads
    return clipped


def grow_model(
    model: Decoder, request: GrowthRequest, optimizer: torch.optim.Optimizer | None = None,
    caps: GrowthCaps | None = None, generator: torch.Generator | None = None,
) -> list[ParamChange]:
    """Grow ``model`` in place as requested (and ``optimizer``'s state with it); returns all changes."""
    target = target_config(model.cfg, request)
    if caps is not None and (problem := cap_violation(target, caps)):
        raise SapwoodError(problem)
    fp = request.function_preserving
    steps = [
        lambda: grow_heads(model, target.heads, target.kv_heads, fp, generator),
        lambda: grow_ffn(model, target.ffn, fp, generator),
        lambda: grow_hidden(model, target.hidden, fp, generator),
        lambda: grow_depth(model, target.layers, request.layer_position, request.depth_init, fp, generator),
    ]
    all_changes: list[ParamChange] = []
    for step in steps:
        changes = step()
        if optimizer is not None and changes:
            apply_changes_to_optimizer(optimizer, changes, model)
        all_changes.extend(changes)
    return all_changes
