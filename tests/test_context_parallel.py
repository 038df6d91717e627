"""Context parallelism: load-balanced causal sharding, exact ring attention on CPU gloo, cp composed with
FSDP2 and tensor parallel reproducing a single-process run's losses within 1e-5, and sizing per rank.

The multi-process tests launch ``tests/distributed/cp_worker.py`` under torchrun (module-scoped fixtures).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sapwood.config import ModelConfig, ParallelConfig
from sapwood.errors import ConfigError
from sapwood.sizing import memory_plan, rank_params, rank_state_bytes
from sapwood.train.context_parallel import shard_positions, shard_sequence, unshard_sequence
from sapwood.train.mesh import ParallelDims, check_world_size
from sapwood.train.parallel import check_parallel_fits_model

HERE = Path(__file__).parent / "distributed"
sys.path.insert(0, str(HERE))

import scenarios  # noqa: E402

STEPS = 4
REL_TOL = 1e-5


def torchrun(nproc: int, out: Path, *args: str) -> None:
    """``cp_worker.py`` under torchrun with ``nproc`` gloo processes; fails with its output on error."""
    # PYTHONFAULTHANDLER: a rank killed by a signal prints every thread's Python stack into the output
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent.parent), PYTHONFAULTHANDLER="1")
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(HERE / "cp_worker.py"), "--out", str(out), *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-12000:]}"


def assert_losses_match(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= REL_TOL * abs(w), f"step {step}: loss {g!r} vs single-process {w!r}"


# --- one process ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shards_cover_the_sequence_once_and_balance_causal_work(cp):
    seq = 32
    shards = [shard_positions(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(shards).tolist()) == list(range(seq))
    # causal query-key pairs per rank: sum over its positions of (position + 1); equal on every rank
    work = {int((s + 1).sum()) for s in shards}
    assert len(work) == 1


def test_unshard_inverts_shard():
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    parts = [shard_sequence(x, 3, r, dim=1) for r in range(3)]
    assert torch.equal(unshard_sequence(parts, dim=1), x)


def test_sequence_not_divisible_by_two_cp_is_one_line_error():
    with pytest.raises(
        ConfigError, match=r"^sequence length 30 is not divisible by 2 x parallel.cp = 4;"
    ) as info:
        shard_positions(30, 2, 0)
    assert "\n" not in str(info.value)


def test_world_size_names_cp():
    with pytest.raises(ConfigError, match=r"tp=2 × pp=1 × dp=1 × cp=2 = 4 but WORLD_SIZE=2"):
        check_world_size(ParallelConfig(tp=2, cp=2), 2)


def test_cp_with_pipeline_is_refused():
    cfg = scenarios.tiny_model_config(False)
    with pytest.raises(ConfigError, match=r"parallel.cp=2 with parallel.pp=2 is not supported"):
        check_parallel_fits_model(cfg, ParallelDims(ParallelConfig(cp=2, pp=2), 4))


def test_fsdp_shards_over_dp_shard_times_cp():
    cfg = ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, ffn=64)
    with_cp = rank_params(cfg, ParallelConfig(dp_shard=2, cp=2), dp_shard_rank=3)
    four_way = rank_params(cfg, ParallelConfig(dp_shard=4), dp_shard_rank=3)
    assert [n for _, n in with_cp] == [n for _, n in four_way]
    assert rank_state_bytes(cfg, ParallelConfig(cp=2)).total * 2 == pytest.approx(
        rank_state_bytes(cfg, ParallelConfig()).total, rel=0.01
    )


def test_activation_memory_per_rank_divides_by_cp():
    cfg = ModelConfig(vocab_size=1000, hidden=256, layers=4, heads=8, ffn=688, trained_context=8192)
    one = memory_plan(cfg, ParallelConfig(), "bf16", "adamw", "full", seq=8192)
    four = memory_plan(cfg, ParallelConfig(cp=4), "bf16", "adamw", "full", seq=8192)
    assert four.activations * 4 == pytest.approx(one.activations, rel=1e-6)
    assert four.logits == one.logits  # the loss sees the gathered logits


# --- torchrun (gloo) --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[bool, list[float]]:
    return {tied: scenarios.reference_losses(tied, STEPS) for tied in (True, False)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cp_two_ranks")
    torchrun(2, out, "--steps", str(STEPS), "ring", "cp2", "cp2_checkpointed")
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cp_four_ranks")
    torchrun(4, out, "--steps", str(STEPS), "ring", "cp2_fsdp2", "cp2_tp2")
    return out


def _read(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("fixture", ["two_ranks", "four_ranks"])
@pytest.mark.parametrize("mask", ["causal", "window5"])
def test_ring_attention_equals_full_attention(request, fixture, mask):
    """Outputs and q/k/v gradients of every rank's shard match SDPA over the whole sequence (GQA)."""
    for rank, diffs in enumerate(_read(request.getfixturevalue(fixture), "ring")[mask]):
        for what, value in diffs.items():
            assert value < 1e-5, f"rank {rank}: {what} differs by {value}"


@pytest.mark.distributed
@pytest.mark.parametrize("name,tied", [("cp2", False), ("cp2_checkpointed", True)])
def test_cp2_matches_single_process(two_ranks, reference, name, tied):
    result = _read(two_ranks, name)
    assert_losses_match(result["losses"], reference[tied])
    assert result["logits_shape"] == [scenarios.BATCH, scenarios.SEQ, 64]
    assert result["ring_layers"] == scenarios.tiny_model_config(tied).layers


@pytest.mark.distributed
@pytest.mark.parametrize("name,tied", [("cp2_fsdp2", True), ("cp2_tp2", False)])
def test_cp_composes_with_fsdp_and_tp(four_ranks, reference, name, tied):
    assert_losses_match(_read(four_ranks, name)["losses"], reference[tied])


@pytest.mark.distributed
@pytest.mark.parametrize(
    "fixture,name", [("two_ranks", "cp2"), ("four_ranks", "cp2_fsdp2"), ("four_ranks", "cp2_tp2")]
)
def test_sizing_predicts_cp_rank_bytes_exactly(request, fixture, name):
    result = _read(request.getfixturevalue(fixture), name)
    assert result["measured"] == result["predicted"]


@pytest.mark.distributed
@pytest.mark.parametrize("fixture,ranks", [("two_ranks", 2), ("four_ranks", 4)])
def test_no_gloo_thread_outlives_shutdown(request, fixture, ranks):
    out = request.getfixturevalue(fixture)
    for rank in range(ranks):
        names = json.loads((out / f"threads_rank{rank}.json").read_text())
        assert names and not [n for n in names if "gloo" in n], f"rank {rank}: {names}"
