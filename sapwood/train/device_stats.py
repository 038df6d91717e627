"""What a GPU run reports beside the loss: model FLOPs utilization and the allocator's memory.

``mfu`` = tokens/s x training FLOPs per token (:func:`sapwood.sizing.flops_per_token`) / the device's
datasheet peak (:data:`sapwood.sizing.flops.PEAK_FLOPS_TABLE`). Fragmentation is the share of memory
the caching allocator holds but no tensor uses: ``(reserved - allocated) / reserved`` from
``torch.cuda.memory_stats``, now and at the peaks.
"""

from __future__ import annotations

from typing import Any

import torch

from sapwood.config import ModelConfig
from sapwood.sizing.flops import flops_per_token, peak_flops

GB = 1e9


def fragmentation(reserved: float, allocated: float) -> float:
    """``(reserved - allocated) / reserved``; 0 when nothing is reserved."""
    return (reserved - allocated) / reserved if reserved > 0 else 0.0


def memory_report(stats: dict[str, Any]) -> dict[str, float]:
    """Peak and current allocated/reserved GB and fragmentation from a ``torch.cuda.memory_stats`` dict."""
    allocated = stats.get("allocated_bytes.all.current", 0)
    reserved = stats.get("reserved_bytes.all.current", 0)
    peak_allocated = stats.get("allocated_bytes.all.peak", 0)
    peak_reserved = stats.get("reserved_bytes.all.peak", 0)
    return {
        "memory_peak_allocated_gb": peak_allocated / GB, "memory_peak_reserved_gb": peak_reserved / GB,
        "memory_allocated_gb": allocated / GB, "memory_reserved_gb": reserved / GB,
        "memory_fragmentation": fragmentation(reserved, allocated),
        "memory_fragmentation_at_peak": fragmentation(peak_reserved, peak_allocated),
        "alloc_retries": float(stats.get("num_alloc_retries", 0)),
    }


def cuda_memory_report(device: torch.device | int | None = None) -> dict[str, float]:
    """:func:`memory_report` of a CUDA device (empty off CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return memory_report(torch.cuda.memory_stats(device))


class MfuMeter:
    """MFU of a Decoder's training from tokens/s; ``None`` when the device's peak is not known."""

    def __init__(self, cfg: ModelConfig, seq: int, device_name: str, precision: str):
        self.flops_per_token = flops_per_token(cfg, seq)
        self.peak = peak_flops(device_name, precision)

    def __call__(self, tokens_per_second: float) -> float | None:
        if self.peak is None:
            return None
        return tokens_per_second * self.flops_per_token / self.peak
