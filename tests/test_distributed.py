"""Distributed training on the CPU with gloo: FSDP2, HSDP, tensor, pipeline and composed parallelism
reproduce a single-process run's losses; checkpoints reshard 4 → 2 → 1 processes; the bytes each rank
holds equal ``sapwood.sizing``'s prediction; bad meshes fail with one line.

The multi-process tests (``-m distributed``) launch ``tests/distributed/worker.py`` under torchrun a
few times (module-scoped fixtures) and compare what it writes. Run them alone with
``pytest -m distributed tests/test_distributed.py``.
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
from sapwood.sizing import stage_layers
from sapwood.train.mesh import ParallelDims, build_parallel_dims, check_world_size
from sapwood.train.parallel import check_parallel_fits_model, stage_indices, stage_layer_ids

HERE = Path(__file__).parent / "distributed"
sys.path.insert(0, str(HERE))

import scenarios  # noqa: E402

REL_TOL = 1e-5
STEPS = 4
SAVE_AFTER = 3


def torchrun(nproc: int, out: Path, *args: str) -> None:
    """Run the worker under torchrun with ``nproc`` gloo processes; fail with its output on error."""
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints every thread's Python stack into the
    # output this assertion shows, so a crash names where it happened.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent.parent), PYTHONFAULTHANDLER="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "worker.py"), "--out", str(out), *args]
    if nproc == 1:
        cmd = [sys.executable, str(HERE / "worker.py"), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-12000:]}"


def read(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def assert_losses_match(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= REL_TOL * abs(w), f"step {step}: loss {g!r} vs single-process {w!r}"


@pytest.fixture(scope="module")
def reference() -> dict[bool, list[float]]:
    """Single-process losses of the tiny model, tied and untied head, for steps 0..STEPS."""
    return {tied: scenarios.reference_losses(tied, STEPS + 1) for tied in (True, False)}


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Path:
    """FSDP×TP, PP×FSDP and PP×TP on 4 ranks; each saves a checkpoint after step 3."""
    out = tmp_path_factory.mktemp("four_ranks")
    torchrun(
        4, out, "--steps", str(STEPS + 1), "--save-after", str(SAVE_AFTER), "fsdp2_tp2", "pp2_fsdp2",
        "pp2_tp2",
    )
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """FSDP, HSDP (replicate), TP and the three pipeline schedules on 2 ranks."""
    out = tmp_path_factory.mktemp("two_ranks")
    torchrun(2, out, "--steps", str(STEPS), "fsdp2", "hsdp_replicate2", "tp2", "pp2_1f1b", "pp2_gpipe",
             "pp2_interleaved")
    return out


@pytest.fixture(scope="module")
def resharded(four_ranks, tmp_path_factory) -> Path:
    """The 4-rank checkpoints loaded with 2 ranks (FSDP, TP from FSDP×TP; PP from PP×FSDP) and with
    1 process, each then training 2 more steps."""
    out = tmp_path_factory.mktemp("resharded")
    step = f"step_{SAVE_AFTER:08d}"
    two_d = four_ranks / "fsdp2_tp2.ckpt" / step
    pipeline = four_ranks / "pp2_fsdp2.ckpt" / step
    torchrun(2, out, "--steps", "2", "--load", f"fsdp2={two_d}", "--load", f"tp2={two_d}",
             "--load", f"pp2_1f1b={pipeline}", "fsdp2", "tp2", "pp2_1f1b")
    torchrun(1, out, "--steps", "2", "--load", f"single_tied={two_d}", "--load", f"single_untied={pipeline}",
             "single_tied", "single_untied")
    return out


# --- fast checks (one process) -------------------------------------------------------------------


def test_world_size_mismatch_is_one_line_error():
    parallel = ParallelConfig(tp=8, pp=8, dp_shard=4)
    with pytest.raises(ConfigError) as info:
        build_parallel_dims(parallel, world_size=8)
    message = str(info.value)
    assert message.startswith("tp=8 × pp=8 × dp=4 = 256 but WORLD_SIZE=8")
    assert "\n" not in message


def test_world_size_mismatch_names_both_dp_degrees():
    with pytest.raises(ConfigError, match=r"dp=4 \(dp_replicate=2 × dp_shard=2\) = 8 but WORLD_SIZE=4"):
        check_world_size(ParallelConfig(dp_replicate=2, dp_shard=2, tp=2), 4)


def test_single_process_needs_no_mesh():
    dims = build_parallel_dims(ParallelConfig(), world_size=1)
    assert dims.mesh is None and dims.dp == 1 and not dims.fsdp_enabled


def test_gqa_heads_must_divide_by_tp():
    cfg = ModelConfig(vocab_size=64, hidden=64, layers=2, heads=8, kv_heads=2, ffn=128)
    with pytest.raises(ConfigError, match=r"model.kv_heads=2 is not divisible by parallel.tp=4"):
        check_parallel_fits_model(cfg, ParallelDims(ParallelConfig(tp=4), 4))
    check_parallel_fits_model(cfg, ParallelDims(ParallelConfig(tp=2), 2))


def test_pipeline_needs_a_layer_per_stage_and_an_untied_head():
    cfg = ModelConfig(vocab_size=64, hidden=32, layers=3, heads=4, ffn=64)
    with pytest.raises(ConfigError, match=r"model.layers=3 is fewer than the 4 pipeline stages"):
        check_parallel_fits_model(cfg, ParallelDims(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), 2))
    tied = cfg.model_copy(update={"tied_embeddings": True})
    with pytest.raises(ConfigError, match="tied_embeddings"):
        check_parallel_fits_model(tied, ParallelDims(ParallelConfig(pp=2), 2))


@pytest.mark.parametrize("layers,pp,interleaved", [(4, 2, False), (5, 2, False), (7, 3, False), (8, 2, True),
                                                    (9, 2, True), (126, 8, False)])
def test_stage_split_agrees_with_sizing(layers, pp, interleaved):
    schedule = "interleaved_1f1b" if interleaved else "1f1b"
    stages = stage_layer_ids(layers, pp * (2 if interleaved else 1))
    assert sorted(i for s in stages for i in s) == list(range(layers))
    for pp_rank in range(pp):
        mine = [i for s in stage_indices(pp_rank, pp, schedule) for i in stages[s]]
        assert mine == stage_layers(layers, pp, pp_rank, interleaved)


def test_reference_run_learns(reference):
    # The reference itself must be a real training run: the loss moves from its start.
    assert reference[True][0] != reference[True][-1]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in reference.values())


# --- multi-process (gloo) ------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", ["fsdp2", "hsdp_replicate2", "tp2", "pp2_1f1b", "pp2_gpipe", "pp2_interleaved"]
)
def test_two_rank_layouts_match_single_process(two_ranks, reference, name):
    tied = scenarios.SCENARIOS[name][2]
    assert_losses_match(read(two_ranks, name)["losses"], reference[tied][:STEPS])


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["fsdp2_tp2", "pp2_fsdp2", "pp2_tp2"])
def test_four_rank_compositions_match_single_process(four_ranks, reference, name):
    tied = scenarios.SCENARIOS[name][2]
    losses = read(four_ranks, name)["losses"]
    assert_losses_match(losses, reference[tied][: len(losses)])


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["fsdp2_tp2", "pp2_fsdp2"])
def test_sizing_predicts_each_ranks_bytes_exactly(four_ranks, name):
    result = read(four_ranks, name)
    assert result["measured"] == result["predicted"]
    assert (
        len({json.dumps(c, sort_keys=True) for c in result["coordinates"]}) == 4
    )  # really 4 distinct shards


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["fsdp2", "tp2", "pp2_1f1b"])
def test_sizing_predicts_two_rank_bytes_exactly(two_ranks, name):
    result = read(two_ranks, name)
    assert result["measured"] == result["predicted"]


@pytest.mark.distributed
@pytest.mark.parametrize("saved,loaders", [
    ("fsdp2_tp2", ["fsdp2", "tp2", "single_tied"]),
    ("pp2_fsdp2", ["pp2_1f1b", "single_untied"]),
])
def test_checkpoint_reshards_to_two_ranks_and_one_process(four_ranks, resharded, saved, loaders):
    """Saved by 4 ranks after step 3: every loader holds bit-identical weights and continues with the
    losses the 4-rank run had for steps 4 and 5 (so optimizer state came back too)."""
    original = read(four_ranks, saved)
    saved_weights = torch.load(original["saved_weights"], weights_only=True)
    for name in loaders:
        result = read(resharded, name)
        assert result["first_step"] == SAVE_AFTER
        loaded = torch.load(result["loaded_weights"], weights_only=True)
        assert loaded.keys() == saved_weights.keys()
        for key, tensor in saved_weights.items():
            assert torch.equal(loaded[key], tensor), f"{name}: {key} differs after resharding"
        assert_losses_match(result["losses"], original["losses"][SAVE_AFTER:SAVE_AFTER + 2])


@pytest.mark.distributed
@pytest.mark.parametrize("fixture,ranks", [("two_ranks", 2), ("four_ranks", 4), ("resharded", 2)])
def test_no_gloo_thread_outlives_shutdown(request, fixture, ranks):
    """After ``shutdown_distributed`` every gloo worker and transport thread of every process group
    (default, mesh dimensions, flattened and pipeline groups) has been joined, so interpreter exit
    tears nothing of gloo down (doing so aborted workers by chance with "terminate called without an
    active exception")."""
    out = request.getfixturevalue(fixture)
    for rank in range(ranks):
        names = json.loads((out / f"threads_rank{rank}.json").read_text())
        assert names, f"rank {rank} recorded no threads"
        assert not [n for n in names if "gloo" in n], f"rank {rank} still runs {names}"


@pytest.mark.distributed
@pytest.mark.parametrize("fixture,names", [
    ("two_ranks", ["fsdp2", "hsdp_replicate2", "tp2", "pp2_1f1b", "pp2_gpipe", "pp2_interleaved"]),
    ("four_ranks", ["fsdp2_tp2", "pp2_fsdp2", "pp2_tp2"])])
def test_each_layout_starts_with_only_the_default_groups_threads(request, fixture, names):
    """A worker runs its layouts one after another; each layout's process groups are destroyed at its
    end on every rank at once, so every later layout starts with the default group's gloo threads
    alone (one transport loop per rank), not with every earlier layout's groups beside them."""
    out = request.getfixturevalue(fixture)
    for name in names[1:]:
        for rank, threads in enumerate(read(out, name)["threads_before"]):
            transports = [t for t in threads if t == "gloo_tcp_loop"]
            assert len(transports) == 1, f"{name}, rank {rank} starts with {sorted(threads)}"


@pytest.mark.distributed
@pytest.mark.parametrize("saved", ["fsdp2_tp2", "pp2_fsdp2"])
def test_consolidate_writes_a_loadable_folder_with_the_saved_weights(four_ranks, tmp_path, saved):
    import sapwood
    from sapwood.train.consolidate import consolidate

    folder = consolidate(four_ranks / f"{saved}.ckpt" / f"step_{SAVE_AFTER:08d}", tmp_path / "plain")
    model = sapwood.load(folder)
    saved_weights = torch.load(read(four_ranks, saved)["saved_weights"], weights_only=True)
    state = model.state_dict()
    for key, tensor in saved_weights.items():
        assert torch.equal(state[key], tensor), key


def test_sapwood_train_with_a_mesh_for_more_processes_exits_2_with_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {vocab_size: 64, hidden: 32, layers: 2, heads: 4, ffn: 64, trained_context: 16}\n"
        f"train: {{steps: 1, batch_size: 2, micro_batch_size: 2, out_dir: {tmp_path / 'out'}, progress: "
        f"false}}\n"
        f"data: {{path: {tmp_path / 'tokens'}}}\n"
        "parallel: {tp: 2, dp_shard: 2}\n"
    )
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "sapwood.cli", "train", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: tp=2 × pp=1 × dp=2 = 4 but WORLD_SIZE=1; the parallel degrees must multiply to the number of "
        "processes"
    ]


def test_cpu_offload_on_a_cpu_run_is_a_clear_error():
    from sapwood.train.parallel import parallelize

    model = scenarios.build_model(tied=True)
    dims = ParallelDims(ParallelConfig(dp_shard=2, cpu_offload=True), 2)
    with pytest.raises(ConfigError, match=r"parallel.cpu_offload=true needs a GPU"):
        parallelize(model, dims, scenarios.loss_fn, "cpu")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("plan", ["{pp: 2, pp_microbatches: 2}", "{dp_shard: 2}", "{cp: 2}"])
def test_sapwood_train_under_torchrun(tmp_path, plan):
    """The real CLI under torchrun: trains, evaluates, checkpoints (sharded) and writes final/, whose
    weights equal the consolidated last checkpoint."""
    import sapwood
    from sapwood.data.text import stdlib_corpus, tokenize_corpus
    from sapwood.train.consolidate import consolidate

    tokenize_corpus(stdlib_corpus(max_files=10), tmp_path / "tokens", vocab_size=300, val_fraction=0.2)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {vocab_size: 320, hidden: 32, layers: 4, heads: 4, kv_heads: 2, ffn: 64, trained_context: "
        "32}\n"
        f"train: {{steps: 4, batch_size: 8, micro_batch_size: 4, eval_every: 2, eval_batches: 2, save_every: "
        f"2,"
        f" log_every: 1, progress: false, device: cpu, out_dir: {out}}}\n"
        f"data: {{path: {tmp_path / 'tokens'}, seq_len: 32}}\n"
        f"parallel: {plan}\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
            "sapwood.cli", "train", str(config),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in events if e["event"] == "train"]
    assert len(train_losses) == 4 and all(0 < x < 10 for x in train_losses)
    assert any(e["event"] == "eval" and "val_loss" in e for e in events)
    final = sapwood.load(out / "final")
    plain = sapwood.load(consolidate(out / "checkpoints" / "step_00000004", tmp_path / "consolidated"))
    for (name, a), b in zip(final.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
