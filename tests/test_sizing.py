"""Sizing: exact counts against the meta-device model, per-rank shard bytes against torch.chunk, optimizer
bytes against a real AdamW, the published activation formulas, FLOPs, the solver and the CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sapwood.config import Config, ModelConfig, ParallelConfig, load_config, preset_names
from sapwood.errors import ConfigError
from sapwood.model import build_model
from sapwood.sizing import (
    SolveRequest,
    activation_bytes_per_layer,
    check_create_fits,
    config_param_counts,
    count_params,
    flops_per_token,
    memory_plan,
    mfu,
    optimizer_bytes,
    padded_param_numel,
    parameter_shapes,
    rank_params,
    rank_state_bytes,
    shard_length,
    size_report,
    solve,
    training_memory_bytes,
)

EXPECTED_TOTALS = {
    "tiny": 3_950_848, "research-799m": 799_090_176, "astro-13b": 13_137_022_976,
    "enterprise-200b": 209_715_474_432, "enterprise-400b": 463_231_270_912,
}
SMALL = ModelConfig(vocab_size=101, hidden=48, layers=5, heads=6, kv_heads=2, ffn=72)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sapwood.cli", *args], capture_output=True, text=True)


def meta_model(config: Config) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(config, "meta")


@pytest.mark.parametrize("preset", preset_names())
def test_count_equals_meta_model_numel_for_every_preset(preset):
    config = load_config(preset)
    model = meta_model(config)
    assert config_param_counts(config).total == sum(p.numel() for p in model.parameters())
    if getattr(config, "cube", None) is None:
        named = {name: tuple(p.shape) for name, p in model.named_parameters()}
        assert [(s.name, s.shape) for s in parameter_shapes(config.model)] == list(named.items())


@pytest.mark.parametrize("preset,total", EXPECTED_TOTALS.items())
def test_preset_totals_and_targets(preset, total):
    counts = count_params(load_config(preset).model)
    assert counts.total == total
    assert counts.embedding + counts.non_embedding == counts.total
    if preset == "astro-13b":
        assert abs(counts.total - 13.14e9) <= 0.01e9
    if preset == "research-799m":
        assert abs(counts.total - 799e6) <= 1e6


def test_counts_by_hand_tied_counted_once():
    # embedding 101*48; per layer: norms 2*48 + q 48*48 + k,v 2*48*16 + o 48*48 + ffn 3*48*72; final norm 48
    per_layer = 96 + 2304 + 1536 + 2304 + 10368
    assert count_params(SMALL).per_layer == per_layer
    assert count_params(SMALL).total == 2 * 101 * 48 + 5 * per_layer + 48
    tied = SMALL.model_copy(update={"tied_embeddings": True})
    assert count_params(tied).total == 101 * 48 + 5 * per_layer + 48
    assert count_params(tied).total == sum(p.numel() for p in meta_model(Config(model=tied)).parameters())


def test_shard_length_is_torch_chunk():
    for size in range(0, 12):
        for parts in range(1, 6):
            chunks = [c.numel() for c in torch.arange(size).chunk(parts)] if size else []
            expected = chunks + [0] * (parts - len(chunks))
            assert [shard_length(size, parts, i) for i in range(parts)] == expected


@pytest.mark.parametrize("parallel", [
    ParallelConfig(dp_shard=4), ParallelConfig(dp_shard=3, tp=2), ParallelConfig(pp=2, dp_shard=2),
    ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", tp=2), ParallelConfig(tp=2, pp=3, dp_shard=5),
])
def test_rank_shards_partition_the_model_like_torch_chunk(parallel):
    """Every element is on exactly one (pp, tp, dp_shard) rank, and each local shape is what torch.chunk
    of the tensor-parallel local tensor gives (FSDP2's dim-0 split)."""
    specs = {s.name: s for s in parameter_shapes(SMALL)}
    total = 0
    for pp_rank in range(parallel.pp):
        for tp_rank in range(parallel.tp):
            for dp_rank in range(parallel.dp_shard):
                for spec, numel in rank_params(SMALL, parallel, pp_rank, tp_rank, dp_rank):
                    tensor = torch.empty(spec.shape, device="meta")
                    if specs[spec.name].tp_dim is not None and parallel.tp > 1:
                        pieces = tensor.chunk(parallel.tp, dim=spec.tp_dim)
                        tensor = (
                            pieces[tp_rank] if tp_rank < len(pieces) else tensor.narrow(spec.tp_dim, 0, 0)
                        )
                    pieces = tensor.chunk(parallel.dp_shard, dim=0)
                    local = pieces[dp_rank] if dp_rank < len(pieces) else tensor.narrow(0, 0, 0)
                    assert numel == local.numel(), (spec.name, pp_rank, tp_rank, dp_rank)
                    total += numel if spec.tp_dim is not None or parallel.tp == 1 else numel / parallel.tp
    assert total == count_params(SMALL).total


def test_fsdp_uneven_rows_and_padding():
    # 5 layers, hidden 48, dp_shard 5: norms of 48 rows split 10,10,10,10,8; padding makes every rank 10
    parallel = ParallelConfig(dp_shard=5)
    last = dict((s.name, n) for s, n in rank_params(SMALL, parallel, dp_shard_rank=4))
    assert last["norm.weight"] == 8 and last["tok_embeddings.weight"] == 17 * 48  # 101 rows: 21,21,21,21,17
    assert padded_param_numel(SMALL, parallel) == sum(math.ceil(s.shape[0] / 5) * s.numel // s.shape[0]
                                                      for s in parameter_shapes(SMALL))


def test_adamw_state_bytes_match_a_real_optimizer(tiny_config):
    model = build_model(tiny_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, tiny_config.model.vocab_size, (1, 8))
    model(tokens).sum().backward()
    optimizer.step()
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    predicted = rank_state_bytes(tiny_config.model, ParallelConfig(), "fp32", "adamw")
    assert (predicted.weights, predicted.grads, predicted.optimizer) == (
        weight_bytes,
        grad_bytes,
        state_bytes,
    )
    assert training_memory_bytes(tiny_config.model) == weight_bytes + grad_bytes + state_bytes


def test_optimizer_and_precision_bytes():
    assert optimizer_bytes(4096, "adamw") == 8 * 4096 + 4
    # torchao AdamW8bit: per moment 1-byte codes, one fp32 scale per 256 values, a 256-entry code book
    assert optimizer_bytes(4096, "adamw8bit") == 2 * (4096 + 4 * 16 + 4 * 256) + 4
    assert optimizer_bytes(4096, "adamw4bit") == 2 * (2048 + 4 * 32 + 4 * 16) + 4
    assert optimizer_bytes(4095, "adamw8bit") == optimizer_bytes(4095, "adamw")  # too small: fp32 moments
    assert optimizer_bytes(4096, "sgd") == 0
    n = count_params(SMALL).total
    assert rank_state_bytes(SMALL, ParallelConfig(), "bf16-pure", "sgd").weights == 2 * n
    assert rank_state_bytes(SMALL, ParallelConfig(), "bf16", "sgd").grads == 4 * n
    with pytest.raises(ConfigError, match="optimizer='lion'"):
        optimizer_bytes(1, "lion")


def test_activation_formulas_korthikanti():
    cfg = ModelConfig(vocab_size=32000, hidden=4096, layers=32, heads=32, ffn=11008)
    s, b, h, a = 2048, 1, 4096, 32
    assert activation_bytes_per_layer(cfg, s, b) == s * b * h * (34 + 5 * a * s / h)
    assert activation_bytes_per_layer(cfg, s, b, tp=8) == s * b * h / 8 * (34 + 5 * a * s / h)
    assert activation_bytes_per_layer(cfg, s, b, tp=8, sequence_parallel=False) == s * b * h * (
        10 + 24 / 8 + 5 * a * s / (h * 8))
    assert activation_bytes_per_layer(cfg, s, b, tp=8, checkpointing="selective") == s * b * h * 34 / 8
    assert activation_bytes_per_layer(cfg, s, b, checkpointing="full") == 2 * s * b * h
    assert (
        activation_bytes_per_layer(cfg, s, b, checkpointing="full", bytes_per_activation=4) == 4 * s * b * h
    )


def test_flops_per_token_and_mfu():
    counts = count_params(SMALL)
    expected = 6 * (counts.non_embedding + 101 * 48) + 12 * 5 * 48 * 64
    assert flops_per_token(SMALL, 64) == expected
    assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)


def test_memory_plan_shards_with_parallelism():
    cfg = load_config("enterprise-200b")
    plan = memory_plan(cfg.model, cfg.parallel, "bf16", "adamw", "full")
    assert plan.total < 80e9  # the preset's TP8 x PP8 x FSDP4 plan fits an 80 GB GPU
    single = memory_plan(cfg.model, ParallelConfig(), "bf16", "adamw", "full")
    assert single.weights == 4 * EXPECTED_TOTALS["enterprise-200b"]
    s, h, t = 32768, 12288, 8  # rank 0 of 1F1B holds pp=8 micro-batches of its 12 checkpointed layers
    assert plan.worst_pp_rank == 0
    assert plan.activations == int(2 * s * h / t * 12 * 8 + 34 * s * h / t)
    more_shards = memory_plan(
        cfg.model, cfg.parallel.model_copy(update={"dp_shard": 8}), "bf16", "adamw", "full"
    )
    assert more_shards.optimizer_state < plan.optimizer_state


def test_solver_astro_and_refusals():
    result = solve(SolveRequest(13.14e9, layers=56, heads=64, near_hidden=4400))
    model = result.model
    assert (model.layers, model.heads, model.hidden, model.ffn) == (56, 64, 4096, 13248)
    assert result.params == EXPECTED_TOTALS["astro-13b"] == count_params(model).total
    with pytest.raises(ConfigError, match="hidden=4400 with heads=64 gives head_dim=68.75.*4096 or 4608"):
        solve(SolveRequest(13.14e9, layers=56, heads=64, hidden=4400))
    with pytest.raises(ConfigError, match="no valid config within tolerance"):
        solve(SolveRequest(1e6, layers=56, heads=64, hidden=4096))
    with pytest.raises(ConfigError, match="ffn=17620 is not a multiple of 64"):
        solve(SolveRequest(13.14e9, layers=56, heads=64, ffn=17620))


@settings(max_examples=25, deadline=None)
@given(target=st.floats(5e7, 5e10), layers=st.one_of(st.none(), st.integers(4, 96)),
       heads=st.one_of(st.none(), st.sampled_from([8, 16, 32, 64])))
def test_solver_returns_valid_shapes_within_tolerance(target, layers, heads):
    try:
        result = solve(SolveRequest(target, layers=layers, heads=heads, tolerance=2e-3))
    except ConfigError:
        return  # refusing is allowed; returning an invalid or far shape is not
    m = result.model
    assert m.hidden % m.heads == 0 and m.head_dim % 8 == 0 and m.ffn % 64 == 0 and m.heads % m.kv_heads == 0
    assert count_params(m).total == result.params
    assert abs(result.params - target) <= 2e-3 * target
    assert (layers is None or m.layers == layers) and (heads is None or m.heads == heads)


def test_create_refuses_before_allocating(tmp_path):
    config = load_config("research-799m")
    with pytest.raises(ConfigError, match=r"needs 6.4 GB of RAM .* only 1.0 GB is available"):
        check_create_fits(config, available_bytes=10**9)
    check_create_fits(config, available_bytes=10**12)
    proc = cli("create", "enterprise-400b", "--out", str(tmp_path / "big"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "3,705.9 GB of RAM" in proc.stderr
    assert not (tmp_path / "big").exists()


def test_size_cli_json_and_table():
    proc = cli("size", "astro-13b", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["params_total"] == EXPECTED_TOTALS["astro-13b"]
    assert report == json.loads(json.dumps(size_report(load_config("astro-13b"))))
    big = json.loads(cli("size", "enterprise-400b", "--json").stdout)
    assert big["params_total"] == EXPECTED_TOTALS["enterprise-400b"]
    assert big["parallel"]["world_size"] == 8 * 16 * 4
    table = cli("size", "tiny")
    assert table.returncode == 0 and "3,950,848" in table.stdout


def test_solve_cli():
    proc = cli("solve", "--params", "13.14e9", "--layers", "56", "--heads", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["hidden"] == 4096
    bad = cli("solve", "--params", "13.14e9", "--layers", "56", "--heads", "64", "--hidden", "4400")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
