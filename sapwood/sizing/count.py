"""Exact parameter counts of a config, by formula (no tensors): every parameter of
:class:`sapwood.model.transformer.Decoder` with its shape, its tensor-parallel dim and its layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sapwood.config import Config, ModelConfig


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, the dim tensor parallel shards (None = replicated) and where it lives
    (``layer`` index, or None for the embedding / final norm / head)."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    layer: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parameter_shapes(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter of the Decoder, in ``named_parameters()`` order (a tied head is not listed).

    Tensor-parallel dims follow ``sapwood.train.parallel``: q/k/v/gate/up column-wise (dim 0), o/down
    row-wise (dim 1), embedding and head vocab-parallel (dim 0), norms replicated.
    """
    h, q_dim, kv_dim = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim

    def linear(name: str, out_dim: int, in_dim: int, tp_dim: int, bias: bool, layer: int) -> list[ParamSpec]:
        """Weight, then bias (sharded with the output rows when column-parallel, else replicated)."""
        weight = ParamSpec(name + ".weight", (out_dim, in_dim), tp_dim, layer)
        return (
            [weight, ParamSpec(name + ".bias", (out_dim,), 0 if tp_dim == 0 else None, layer)]
            if bias
            else [weight]
        )

    specs = [ParamSpec("tok_embeddings.weight", (cfg.vocab_size, h), 0, None)]
    for i in range(cfg.layers):
        p = f"layers.{i}."
        specs += [
            ParamSpec(p + "attention_norm.weight", (h,), None, i),
            *linear(p + "attention.wq", q_dim, h, 0, cfg.qkv_bias, i),
            *linear(p + "attention.wk", kv_dim, h, 0, cfg.qkv_bias, i),
            *linear(p + "attention.wv", kv_dim, h, 0, cfg.qkv_bias, i),
            *linear(p + "attention.wo", h, q_dim, 1, cfg.attention_out_bias, i),
        ]
        if cfg.qk_norm:
            specs += [ParamSpec(p + "attention.q_norm.weight", (cfg.head_dim,), None, i),
                      ParamSpec(p + "attention.k_norm.weight", (cfg.head_dim,), None, i)]
        specs += [
            ParamSpec(p + "ffn_norm.weight", (h,), None, i),
            *linear(p + "feed_forward.w1", cfg.ffn, h, 0, cfg.mlp_bias, i),
            *linear(p + "feed_forward.w3", cfg.ffn, h, 0, cfg.mlp_bias, i),
            *linear(p + "feed_forward.w2", h, cfg.ffn, 1, cfg.mlp_bias, i),
        ]
    specs.append(ParamSpec("norm.weight", (h,), None, None))
    if not cfg.tied_embeddings:
        specs.append(ParamSpec("output.weight", (cfg.vocab_size, h), 0, None))
    return specs


@dataclass(frozen=True)
class ParamCounts:
    """``embedding`` = token embedding + untied output head (tied: counted once);
    ``non_embedding`` = everything else (blocks and final norm)."""

    total: int
    embedding: int
    non_embedding: int
    per_layer: int


def layer_params(cfg: ModelConfig) -> int:
    """One block: 2h (norms) + h*(q + 2 kv + q) (attention) + 3 h ffn (SwiGLU), plus the family options:
    q + 2 kv (q/k/v biases), h (output bias), 2 head_dim (q/k norms), 2 ffn + h (FFN biases)."""
    q_dim, kv_dim = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    options = ((q_dim + 2 * kv_dim) * cfg.qkv_bias + cfg.hidden * cfg.attention_out_bias
               + 2 * cfg.head_dim * cfg.qk_norm + (2 * cfg.ffn + cfg.hidden) * cfg.mlp_bias)
    return 2 * cfg.hidden + cfg.hidden * (2 * q_dim + 2 * kv_dim) + 3 * cfg.hidden * cfg.ffn + options


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact counts by formula: V h (embedding) + L * layer + h (final norm) + V h (untied head)."""
    embedding = cfg.vocab_size * cfg.hidden * (1 if cfg.tied_embeddings else 2)
    per_layer = layer_params(cfg)
    non_embedding = cfg.layers * per_layer + cfg.hidden
    return ParamCounts(embedding + non_embedding, embedding, non_embedding, per_layer)


def config_param_specs(config: Config) -> list[ParamSpec]:
    """Parameter specs of any root config: by formula for the Decoder; other models (e.g. a cube
    surrogate) are built on the meta device and read off (no tensor parallel dims)."""
    if getattr(config, "cube", None) is None:
        return parameter_shapes(config.model)
    import torch

    from sapwood.model.folder import build_model

    with torch.device("meta"):
        model = build_model(config, "meta")
    specs = []
    for name, param in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        specs.append(ParamSpec(name, tuple(param.shape), None, layer))
    return specs


def config_param_counts(config: Config) -> ParamCounts:
    """Counts for any root config; for models other than the Decoder, ``embedding`` is everything
    outside the blocks and the final norm."""
    if getattr(config, "cube", None) is None:
        return count_params(config.model)
    specs = config_param_specs(config)
    total = sum(s.numel for s in specs)
    blocks = sum(s.numel for s in specs if s.layer is not None)
    final_norm = sum(s.numel for s in specs if s.name.startswith("norm."))
    return ParamCounts(
        total, total - blocks - final_norm, blocks + final_norm, blocks // max(config.model.layers, 1)
    )
