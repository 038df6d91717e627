"""GPU readiness, the parts a CPU can check: the attention kernel check (flash / memory-efficient or a
one-line error, never a silent math kernel), fused AdamW, MFU from the sizing FLOPs and the per-device
peak table, fragmentation from ``torch.cuda.memory_stats`` figures, and ``sapwood bench gpu --smoke``
(the device check's code path on tiny shapes) with ``scripts/device-check.sh --dry-run``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sapwood.config import ModelConfig
from sapwood.model.transformer import (
    AttentionKernelError,
    attention_kernel,
    check_fused_attention,
    needs_fused_attention,
    sdpa_kernel_choice,
)
from sapwood.sizing import flops_per_token, peak_flops
from sapwood.train.device_stats import MfuMeter, fragmentation, memory_report
from sapwood.train.optim import make_optimizer

CFG = ModelConfig(vocab_size=64, hidden=64, layers=1, heads=4, kv_heads=2, ffn=128)
REPO = Path(__file__).parent.parent


def test_training_attention_uses_the_fused_kernel_and_never_math_silently():
    assert attention_kernel(CFG, 256, torch.bfloat16, "cpu") == "flash"
    assert check_fused_attention(CFG, 256, torch.float32, "cpu") == "flash"
    with sdpa_kernel([SDPBackend.MATH]):  # a device where only the math kernel accepts the inputs
        assert attention_kernel(CFG, 256, torch.bfloat16, "cpu") == "math"
        with pytest.raises(AttentionKernelError) as info:
            check_fused_attention(CFG, 4096, torch.bfloat16, "cpu")
    message = str(info.value)
    assert (
        "seq 4096" in message
        and "math kernel" in message
        and "head_dim 16" in message
        and "\n" not in message
    )
    # restricted to the fused kernels (as Attention does on CUDA at long sequence) nothing runs then
    assert attention_kernel(CFG, 256, torch.bfloat16, "cpu", fused_only=True) == "flash"


def test_sdpa_choice_follows_the_enabled_kernels_for_grouped_query_attention():
    q, kv = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    assert sdpa_kernel_choice(q, kv, kv) == "flash"
    with sdpa_kernel([SDPBackend.MATH]):
        assert sdpa_kernel_choice(q, kv, kv) == "math"
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), pytest.raises(RuntimeError):
        sdpa_kernel_choice(q, kv, kv)  # no CPU kernel among the enabled ones
    assert not needs_fused_attention(torch.randn(1, 4, 4096, 16))  # CPU tensors are never restricted


def test_adamw_is_the_fused_kernel():
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    optimizer = make_optimizer(params, "adamw", "fp32", torch.device("cpu"), 1e-3, (0.9, 0.95))
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H200", "bf16", 989e12), ("NVIDIA H100 80GB HBM3", "bf16-pure", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12), ("NVIDIA A100-SXM4-80GB", "fp32", 19.5e12),
    ("NVIDIA L40S", "fp16", 362e12), ("Some Future GPU", "bf16", None),
])
def test_peak_flops_table(name, precision, peak):
    assert peak_flops(name, precision) == peak


def test_mfu_from_the_sizing_flops():
    llama8b = ModelConfig(vocab_size=128256, hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336)
    # 6 N + 12 L H s: N = 8.03e9 matmul parameters (all but the input embedding; the head counts)
    per_token = flops_per_token(llama8b, 8192)
    assert per_token == pytest.approx(6 * 7_504_924_672 + 12 * 32 * 4096 * 8192, rel=1e-12)
    meter = MfuMeter(llama8b, 8192, "NVIDIA H100 80GB HBM3", "bf16")
    # torchtitan's 6,667 tokens/s per H100 for Llama 3.1 8B is about 0.41 MFU by this count
    assert meter(6667.0) == pytest.approx(6667.0 * per_token / 989e12) and 0.35 < meter(6667.0) < 0.45
    assert MfuMeter(llama8b, 8192, "cpu", "bf16")(6667.0) is None


def test_fragmentation_from_memory_stats():
    gib = 1024**3
    stats = {
        "allocated_bytes.all.current": 6 * gib, "reserved_bytes.all.current": 8 * gib,
        "allocated_bytes.all.peak": 60 * gib, "reserved_bytes.all.peak": 64 * gib, "num_alloc_retries": 2,
    }
    report = memory_report(stats)
    assert report["memory_fragmentation"] == pytest.approx(0.25)
    assert report["memory_fragmentation_at_peak"] == pytest.approx(4 / 64)
    assert (
        report["memory_peak_allocated_gb"] == pytest.approx(60 * gib / 1e9) and report["alloc_retries"] == 2
    )
    assert fragmentation(0, 0) == 0.0


@pytest.mark.slow
def test_device_check_dry_run_runs_the_gpu_bench_code_path_on_the_cpu(tmp_path):
    """``scripts/device-check.sh --dry-run`` = ``sapwood bench gpu --smoke``: every model trains (losses
    finite), forward and backward are timed apart, the attention kernel is named, the plan is attached;
    then ``sapwood bench grow`` on the CPU shapes: function-preserving methods keep the loss at growth."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "device-check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert payload["suite"] == "gpu" and payload["extra"]["smoke"] is True
    models = payload["extra"]["models"]
    assert set(models) == {"astro-13b", "research-799m", "llama3-8b-shape"}
    for name, figures in models.items():
        assert figures["attention_kernel"] == "flash", name
        assert len(figures["forward_s"]) == len(figures["backward_s"]) == 2 and min(figures["forward_s"]) > 0
        assert all(0 < loss < 20 for loss in figures["losses"]) and figures["planned_gb"] > 0
    assert models["astro-13b"]["options"]["optimizer"] == "adamw8bit"
    names = {row["name"] for row in payload["results"]}
    assert {"astro-13b forward", "astro-13b tokens/s", "llama3-8b-shape tokens/s"} <= names
    # then `sapwood bench grow`: scratch L and three growth methods at half the steps, two seeds
    grow = json.loads((tmp_path / "out" / "grow.json").read_text())
    assert grow["suite"] == "grow" and grow["extra"]["seeds_run"] == 2 and len(grow["results"]) == 6
    for seed in grow["extra"]["seeds"]:
        curves = {c["name"]: c for c in seed["curves"]}
        assert set(curves) == {"scratch", "zero@0.5", "masked@0.5", "random@0.5"}
        assert all(c["growth_step"] == 5 for name, c in curves.items() if name != "scratch")
        assert abs(curves["zero@0.5"]["loss_jump"]) < 1e-5 and abs(curves["masked@0.5"]["loss_jump"]) < 1e-5
    assert all(len(row["params"]["flops_ratio_per_seed"]) == 2 for row in grow["results"])
