"""Training FLOPs per token, model FLOPs utilization and the peak FLOP/s of known devices."""

from __future__ import annotations

from sapwood.config import ModelConfig
from sapwood.sizing.count import count_params

# Peak dense matmul throughput (FLOP/s) used for MFU: vendor datasheet numbers, no sparsity.
PEAK_FLOPS = {
    ("h100", "bf16"): 989e12, ("h100", "fp16"): 989e12, ("h100", "fp32"): 67e12,
    ("h200", "bf16"): 989e12, ("h200", "fp16"): 989e12, ("h200", "fp32"): 67e12,
    ("a100", "bf16"): 312e12, ("a100", "fp16"): 312e12, ("a100", "fp32"): 19.5e12,
}



def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L (heads * head_dim) s`` (Kaplan et al. 2020; PaLM App. B).

    ``N`` counts the parameters that take part in matmuls: everything but the input embedding lookup
    (the head counts even when tied). The attention term is forward+backward of QK^T and AV over the
    full ``s x s`` matrix (causal masking could halve it; MFU conventionally does not).
    """
    counts = count_params(cfg)
    matmul_params = counts.non_embedding + cfg.vocab_size * cfg.hidden
    return 6 * matmul_params + 12 * cfg.layers * cfg.heads * cfg.head_dim * seq


def mfu(tokens_per_second: float, flops_per_token_value: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware peak (0..1)."""
    return tokens_per_second * flops_per_token_value / peak_flops_per_second


def peak_flops(device_name: str, precision: str = "bf16") -> float | None:
    """Datasheet peak dense FLOP/s for a device name such as ``"NVIDIA H100 80GB HBM3"`` (None if unknown)."""
    dtype = "fp32" if precision == "fp32" else ("fp16" if precision == "fp16" else "bf16")
    lowered = device_name.lower()
    for (chip, kind), value in PEAK_FLOPS.items():
        if chip in lowered and kind == dtype:
            return value
    return None
