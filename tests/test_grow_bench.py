"""`bench grow` bookkeeping: FLOPs/seconds to the target are read off the curves, ratios are
baseline/run; a short real run writes the suite JSON and plot."""

from __future__ import annotations

import json

import pytest

from sapwood.bench.grow import BenchSettings, RunCurve, _results, run_grow_bench, shapes


def curve(name: str, losses: list[float], flops_per_eval: float, growth_step: int | None = None) -> RunCurve:
    n = len(losses)
    return RunCurve(name, flops=[flops_per_eval * (i + 1) for i in range(n)], seconds=[0.5 * (i + 1) for i in range(n)],
                    steps=[10 * (i + 1) for i in range(n)], val_loss=losses, growth_step=growth_step, loss_jump=0.0)


def test_flops_to_target_and_ratios():
    small, large = shapes(BenchSettings(), 512)
    assert (small.layers, small.hidden, large.layers, large.hidden) == (2, 32, 4, 64)
    assert large.heads == 2 * small.heads and large.head_dim == small.head_dim
    scratch = curve("scratch", [5.0, 4.0, 3.0], 100.0)
    grown = curve("ours", [5.5, 4.5, 3.5, 2.9], 40.0, growth_step=10)
    never = curve("random", [6.0, 5.0], 30.0, growth_step=10)
    results = _results([scratch, grown, never], 3.0, BenchSettings(), small, large)
    ours_flops, ours_seconds, random_flops = results[0], results[1], results[2]
    assert ours_flops.value == 160.0 and ours_flops.baseline_value == 300.0 and ours_flops.ratio == 300.0 / 160.0
    assert ours_flops.params["steps_to_target"] == 40 and ours_flops.params["scratch_steps_to_target"] == 30
    assert ours_seconds.value == 2.0 and ours_seconds.baseline_value == 1.5
    assert random_flops.params["reached_target"] is False and random_flops.value == 60.0


@pytest.mark.slow
def test_short_real_run_writes_the_suite(tmp_path):
    path = run_grow_bench(tmp_path / "out", steps=6, data_dir=tmp_path, max_files=8)
    payload = json.loads(path.read_text())
    assert payload["suite"] == "grow" and len(payload["results"]) == 6
    assert (tmp_path / "out" / "grow.png").stat().st_size > 0
    ours = next(c for c in payload["extra"]["curves"] if c["name"] == "ours")
    assert ours["growth_step"] == 1 and abs(ours["loss_jump"]) < 1e-5  # function-preserving in the bench too
