"""Training FLOPs per token, model FLOPs utilization and the peak FLOP/s of known devices."""

from __future__ import annotations

from sapwood.config import ModelConfig
from sapwood.sizing.count import count_params

# Peak dense matmul throughput (FLOP/s) for MFU: vendor datasheet numbers, no sparsity. Keys are
# matched against the device name (``torch.cuda.get_device_name``) in this order, so the specific
# variants (H100 PCIe, H100 NVL) come before the plain chip name (H100 = the SXM part).
PEAK_FLOPS_TABLE: list[tuple[str, dict[str, float]]] = [
    ("h100 pcie", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("h100 nvl", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("h100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("h200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("gh200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("b200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 80e12}),
    ("a100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("l40s", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("l4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("a10g", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12}), ("v100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("mi300x", {"bf16": 1307e12, "fp16": 1307e12, "fp32": 163e12}),
]
PEAK_FLOPS = {(chip, kind): value for chip, rates in PEAK_FLOPS_TABLE for kind, value in rates.items()}


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
    """Datasheet peak dense FLOP/s for a device name such as ``"NVIDIA H100 80GB HBM3"`` and a training
    precision (``bf16-pure`` counts as bf16); None when the device or its precision is not in the table."""
    dtype = "fp32" if precision == "fp32" else ("fp16" if precision == "fp16" else "bf16")
    lowered = device_name.lower()
    for chip, rates in PEAK_FLOPS_TABLE:
        if chip in lowered:
            return rates.get(dtype)
    return None
