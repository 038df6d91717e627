"""`bench grow` bookkeeping: FLOPs/seconds to the target are read off the curves (crossing interpolated
between evaluations), ratios are baseline/run, seeds give mean, spread and minimum; a short real run
writes the suite JSON and plot."""

from __future__ import annotations

import json

import pytest

from sapwood.bench.grow import BenchSettings, RunCurve, _results, _seed_results, run_grow_bench, shapes
from sapwood.errors import SapwoodError


def curve(name: str, losses: list[float], flops_per_eval: float, growth_step: int | None = None) -> RunCurve:
    n = len(losses)
    return RunCurve(
        name, flops=[flops_per_eval * (i + 1) for i in range(n)], seconds=[0.5 * (i + 1) for i in range(n)],
        steps=[10 * (i + 1) for i in range(n)], val_loss=losses, growth_step=growth_step, loss_jump=0.0,
    )


def test_flops_to_target_and_ratios():
    small, large = shapes(BenchSettings(), 512)
    assert (small.layers, small.hidden, large.layers, large.hidden) == (2, 32, 4, 64)
    assert large.heads == 2 * small.heads and large.head_dim == small.head_dim
    scratch = curve("scratch", [5.0, 4.0, 3.0], 100.0)
    grown = curve("zero", [5.5, 4.5, 3.5, 2.9], 40.0, growth_step=10)
    never = curve("random", [6.0, 5.0], 30.0, growth_step=10)
    results = _results([scratch, grown, never], 3.0, BenchSettings(), small, large)
    zero_flops, zero_seconds, random_flops = results[0], results[1], results[2]
    crossing = 120.0 + 40.0 * (0.5 / 0.6)  # between the evaluations at 3.5 and 2.9
    assert zero_flops.value == pytest.approx(crossing) and zero_flops.baseline_value == 300.0
    assert zero_flops.ratio == pytest.approx(300.0 / crossing)
    assert zero_flops.params["steps_to_target"] == [pytest.approx(30 + 10 * 0.5 / 0.6)]
    assert zero_seconds.value == pytest.approx(1.5 + 0.5 * 0.5 / 0.6) and zero_seconds.baseline_value == 1.5
    assert random_flops.params["reached_target"] == [False] and random_flops.value == 60.0


def test_seeds_give_mean_spread_and_minimum():
    small, large = shapes(BenchSettings(), 512)
    seed0 = ([curve("scratch", [4.0, 3.0], 100.0), curve("masked", [3.0], 50.0)], 3.0)  # ratio 4
    seed1 = ([curve("scratch", [4.0, 3.0], 100.0), curve("masked", [3.0], 100.0)], 3.0)  # ratio 2
    flops = _seed_results([seed0, seed1], BenchSettings(), small, large)[0]
    assert flops.params["flops_ratio_per_seed"] == [4.0, 2.0]
    assert flops.params["flops_ratio_mean"] == 3.0 and flops.params["flops_ratio_min"] == 2.0
    assert flops.params["flops_ratio_std"] == pytest.approx(2**0.5)
    assert flops.ratio == pytest.approx(400.0 / 150.0)  # summed FLOPs over seeds


def test_unknown_method_is_a_one_line_error(tmp_path):
    with pytest.raises(SapwoodError, match="growth method 'bogus' is not one of zero, random, masked"):
        run_grow_bench(tmp_path, methods=["bogus"])


@pytest.mark.slow
def test_short_real_run_writes_the_suite(tmp_path):
    path = run_grow_bench(
        tmp_path / "out", steps=6, data_dir=tmp_path, max_files=8, seeds=2,
        methods=["zero", "masked", "gstack"],
    )
    payload = json.loads(path.read_text())
    assert payload["suite"] == "grow" and len(payload["results"]) == 6
    assert (tmp_path / "out" / "grow.png").stat().st_size > 0
    assert len(payload["extra"]["seeds"]) == 2
    for name in ("zero", "masked"):  # function-preserving in the bench too
        grown = next(c for c in payload["extra"]["seeds"][0]["curves"] if c["name"] == name)
        assert grown["growth_step"] == 1 and abs(grown["loss_jump"]) < 1e-5
    assert len(payload["results"][0]["params"]["flops_ratio_per_seed"]) == 2


def test_lr_factor_warms_up_and_rewarms_after_growth():
    from sapwood.bench.grow import lr_factor

    assert [lr_factor(s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # growth after step 6: steps 7, 8, 9 run at 1/3, 2/3, 1 of the LR; without re-warm-up nothing changes
    assert [lr_factor(s, 4, 3, grow_at=6) for s in range(5, 10)] == [
        1.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0, 1.0,
    ]
    assert [lr_factor(s, 4, 0, grow_at=6) for s in range(5, 10)] == [1.0] * 5


def test_budget_curve_counts_each_shapes_flops_from_a_real_run(tokens_dir, tmp_path):
    from sapwood.bench.grow import budget_curve
    from sapwood.sizing import flops_per_token
    from sapwood.train.callbacks import callbacks_from_config
    from sapwood.train.loop import Trainer
    from tests.test_grow_training import make_config

    growth = {"at_steps": [2], "method": "masked", "mask_ramp_steps": 2, "add": {"layers": 1, "ffn": 32}}
    config = make_config(tokens_dir, tmp_path, growth=growth, steps=4, eval_every=1)
    Trainer(config, callbacks_from_config(config)).fit()
    start = config.model
    curve = budget_curve("grown", tmp_path / "metrics.jsonl", start, seq_len=32)
    tokens = config.train.batch_size * 32
    grown = start.model_copy(update={"layers": 3, "ffn": 96})
    small_flops, large_flops = flops_per_token(start, 32) * tokens, flops_per_token(grown, 32) * tokens
    assert curve.growth_step == 2 and curve.steps == [1, 2, 3, 4]
    assert curve.flops == pytest.approx(
        [small_flops, 2 * small_flops, 2 * small_flops + large_flops, 2 * small_flops + 2 * large_flops]
    )
    assert len(curve.val_loss) == 4 and curve.seconds == sorted(curve.seconds)


def test_budget_bench_rejects_an_unknown_method(tmp_path):
    from sapwood.bench.grow import run_budget_bench

    with pytest.raises(SapwoodError, match="method='bogus' must be zero or masked"):
        run_budget_bench(tmp_path, method="bogus")


def test_method_variants_set_grow_fraction_and_rewarm():
    from sapwood.bench.grow import parse_variant

    base = BenchSettings(grow_fraction=0.3, rewarm_steps=0)
    name, variant = parse_variant("masked@0.5+rewarm20", base)
    assert (name, variant.grow_fraction, variant.rewarm_steps) == ("masked", 0.5, 20)
    name, variant = parse_variant("gstack", base)
    assert (name, variant.grow_fraction, variant.rewarm_steps) == ("gstack", 0.3, 0)
    with pytest.raises(SapwoodError, match="grow fraction 1.5 must be between 0 and 1"):
        parse_variant("random@1.5", base)
    with pytest.raises(SapwoodError, match=r"'random\+warm' is not one of"):
        parse_variant("random+warm", base)


@pytest.mark.slow
def test_budget_stops_starting_seeds_and_the_suite_holds_the_seeds_run(tokens_dir, tmp_path):
    """With a budget the first seed already spent, the second is not started; grow.json (written after
    every seed) says so, and evaluation defaults to every steps / 50 steps (at least 1)."""
    (tmp_path / "tokens").symlink_to(tokens_dir)  # the session's token folder: nothing to tokenize
    path = run_grow_bench(
        tmp_path / "out", steps=4, data_dir=tmp_path, seeds=3, methods=["masked@0.5"], budget_s=1e-6
    )
    extra = json.loads(path.read_text())["extra"]
    assert (extra["seeds_requested"], extra["seeds_run"], extra["eval_every"]) == (3, 1, 1)
    assert [s["seed"] for s in extra["seeds"]] == [0]
    scratch = extra["seeds"][0]["curves"][0]
    assert scratch["name"] == "scratch" and scratch["steps"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("option", "message"),
    [({"eval_every": 0}, "eval_every=0 must be >= 1"), ({"budget_s": 0.0}, "budget_s=0.0 must be > 0")],
)
def test_bad_eval_every_or_budget_is_a_one_line_error(tmp_path, option, message):
    with pytest.raises(SapwoodError, match=message):
        run_grow_bench(tmp_path, **option)
