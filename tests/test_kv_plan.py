"""KV planning for long requests: bytes per token, the longest context per device under a preset's TP x PP
serving split (``sapwood size``), and the server's budget refusal naming the room left."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sapwood.config import ModelConfig, ParallelConfig, load_config
from sapwood.infer.kv_cache import KVBudget, KVBudgetError
from sapwood.sizing.kv import kv_bytes_per_token, kv_heads_per_tp_rank, kv_plan

TWO_M = 2_097_152


def test_enterprise_200b_kv_per_token_is_the_published_shape():
    # 96 layers x 12 KV heads x head_dim 128, keys and values, 2 bytes (bf16): ~0.59 MB per token
    cfg = load_config("enterprise-200b").model
    assert kv_bytes_per_token(cfg) == 2 * 96 * 12 * 128 * 2 == 589_824
    plan = kv_plan(cfg, ParallelConfig(tp=8, pp=8))
    assert plan.as_dict()["max_context_kv_bytes_total"] == 589_824 * TWO_M  # ~1.24 TB for 2M tokens


@pytest.mark.parametrize(
    "heads,kv_heads,tp,want",
    [(96, 12, 8, 2), (128, 16, 8, 2), (32, 8, 8, 1), (8, 2, 8, 1), (32, 8, 1, 8), (24, 6, 4, 2)],
)
def test_kv_heads_a_tensor_rank_keeps(heads, kv_heads, tp, want):
    cfg = ModelConfig(vocab_size=64, hidden=heads * 8, layers=1, heads=heads, kv_heads=kv_heads, ffn=64)
    assert kv_heads_per_tp_rank(cfg, tp) == want


def test_longest_context_is_the_budget_over_the_devices_kv_per_token():
    cfg = ModelConfig(
        vocab_size=1000, hidden=512, layers=6, heads=8, kv_heads=4, ffn=1024, max_context=1 << 20
    )
    plan = kv_plan(cfg, ParallelConfig(tp=2, pp=3), device_gb=1.0, reserve=0.25)
    # pipeline stages of 2 layers; 2 KV heads of 64 per tensor rank; bf16
    assert plan.bytes_per_token_per_device == 2 * 2 * 2 * 64 * 2
    weights = plan.weight_bytes_per_device
    # the worst stage is the last: 2 blocks (q, o 512x512, k, v 256x512 and the FFN split over tp 2; two
    # replicated norms), the final norm and half of the 1000x512 head; 2 bytes each
    block = (2 * 512 * 512 + 2 * 256 * 512) // 2 + 3 * 512 * 1024 // 2 + 2 * 512
    assert weights == 2 * (2 * block + 512 + 1000 * 512 // 2)
    assert (
        plan.longest_context_per_device == (10**9 - 250_000_000 - weights) // plan.bytes_per_token_per_device
    )
    assert not plan.max_context_fits


def _size_json(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "sapwood.cli", "size", *args, "--json"], capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["kv_cache"]


def test_sapwood_size_reports_whether_2m_tokens_fit_per_device():
    roomy = _size_json("enterprise-200b")
    assert roomy["max_context"] == TWO_M and roomy["tp"] == 8 and roomy["pp"] == 8
    assert roomy["bytes_per_token_per_device"] == 2 * 12 * 2 * 128 * 2  # 12 layers x 2 KV heads per GPU
    assert roomy["max_context_fits"] and roomy["longest_context_per_device"] >= TWO_M
    small = _size_json("enterprise-200b", "--device-gb", "30")
    assert not small["max_context_fits"] and small["longest_context_per_device"] < TWO_M


def test_server_budget_refusal_names_the_room_left_and_that_room_fits():
    cfg = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, max_context=4096)
    budget = KVBudget.for_model(cfg, torch.float32, max_rows=8, max_bytes=3_000_000)
    room = budget.longest_alone()
    assert 0 < room < cfg.max_context and room % 64 == 0
    budget.check_alone(room)  # fits
    with pytest.raises(KVBudgetError) as info:
        budget.check_alone(room + 1)
    message = str(info.value)
    assert f"room for {room} positions at {budget.bytes_per_position:,} bytes each" in message
    assert "\n" not in message
