"""KV-cache planning for long requests: bytes per token and the longest context one device can hold.

A served model keeps, per token and layer, one key and one value vector per KV head:
``2 x layers x kv_heads x head_dim x bytes`` for the whole model (enterprise-200b in bf16:
2 x 96 x 12 x 128 x 2 = 589,824 bytes, ~0.59 MB per token, ~1.24 TB for 2,097,152 tokens).

Under the preset's serving plan one replica is a TP x PP group: pipeline rank ``p`` keeps the KV of its
stage's layers, tensor rank ``t`` that of the KV heads its query heads read (:func:`kv_heads_per_tp_rank`:
``kv_heads / tp`` when ``tp`` divides them, otherwise some KV heads are kept on two ranks, as vLLM
replicates them when ``tp`` exceeds them). The device's weights are its bf16 share of the model
(:func:`sapwood.sizing.rank_params` with
the TP x PP split, no FSDP: every replica holds a whole model). What remains of ``device_gb`` after the
weights and ``reserve`` (activations, workspace; vLLM's default ``gpu_memory_utilization`` 0.9 leaves
10 %) is the KV budget; the longest context is that budget over the device's KV bytes per token (one
request; ``n`` concurrent requests share it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sapwood.config import ModelConfig, ParallelConfig
from sapwood.errors import ConfigError
from sapwood.sizing.memory import rank_params, stage_layers

DEFAULT_DEVICE_GB = 80.0  # an 80 GB accelerator (A100 / H100 80GB)
DEFAULT_RESERVE = 0.10


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """Keys + values of every layer for one token (the whole model, no parallelism)."""
    return 2 * cfg.layers * cfg.kv_heads * cfg.head_dim * bytes_per_element


def kv_heads_per_tp_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads the busiest tensor rank keeps: those of its ``heads / tp`` query heads (query head ``i``
    reads KV head ``i // (heads / kv_heads)``). ``kv_heads / tp`` when ``tp`` divides ``kv_heads``; more
    when a rank's query heads straddle KV heads (12 KV heads over tp 8: 2 per rank, some kept twice)."""
    per_rank = math.ceil(cfg.heads / tp)
    touched = 0
    for rank in range(tp):
        first, last = rank * per_rank, min(cfg.heads, (rank + 1) * per_rank) - 1
        if first <= last:
            touched = max(touched, last // cfg.kv_groups - first // cfg.kv_groups + 1)
    return touched


@dataclass(frozen=True)
class KVPlan:
    """The KV plan of one device of a TP x PP serving replica (the worst pipeline rank)."""

    bytes_per_token: int  # whole model
    tp: int
    pp: int
    kv_heads_per_device: int
    layers_per_device: int
    bytes_per_token_per_device: int
    device_bytes: int
    weight_bytes_per_device: int
    reserve_bytes: int
    kv_budget_bytes: int
    longest_context_per_device: int
    max_context: int

    @property
    def max_context_fits(self) -> bool:
        return self.longest_context_per_device >= self.max_context

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_context_fits": self.max_context_fits,
                "max_context_kv_bytes_per_device": self.max_context * self.bytes_per_token_per_device,
                "max_context_kv_bytes_total": self.max_context * self.bytes_per_token}


def kv_plan(cfg: ModelConfig, parallel: ParallelConfig, device_gb: float = DEFAULT_DEVICE_GB,
            bytes_per_element: int = 2, reserve: float = DEFAULT_RESERVE) -> KVPlan:
    """The per-device KV plan of ``cfg`` served with ``parallel``'s TP x PP split (bf16 weights and KV
    by default; ``reserve``: the fraction of ``device_gb`` kept for activations and workspace)."""
    if device_gb <= 0:
        raise ConfigError(f"device memory {device_gb} GB must be positive")
    if not 0 <= reserve < 1:
        raise ConfigError(f"reserve={reserve} must be in [0, 1)")
    serving = ParallelConfig(tp=parallel.tp, pp=parallel.pp)
    worst_layers, worst_weights = 0, 0
    for pp_rank in range(parallel.pp):
        layers = len(stage_layers(cfg.layers, parallel.pp, pp_rank))
        weights = sum(n for _, n in rank_params(cfg, serving, pp_rank=pp_rank)) * bytes_per_element
        if (layers, weights) > (worst_layers, worst_weights):
            worst_layers, worst_weights = layers, weights
    heads = kv_heads_per_tp_rank(cfg, parallel.tp)
    per_device = 2 * worst_layers * heads * cfg.head_dim * bytes_per_element
    device_bytes = int(device_gb * 1e9)
    reserve_bytes = int(device_bytes * reserve)
    budget = max(0, device_bytes - reserve_bytes - worst_weights)
    return KVPlan(kv_bytes_per_token(cfg, bytes_per_element), parallel.tp, parallel.pp, heads, worst_layers,
                  per_device, device_bytes, worst_weights, reserve_bytes, budget, budget // per_device,
                  cfg.max_context)

