"""Context extension (``context:`` in a training config) and the passkey-retrieval evaluation: the
machinery on a tiny model trained for a few steps (the accuracy table itself is in the notes / bench)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sapwood.bench.passkey import extend_config, passkey_table, tiny_passkey_config
from sapwood.config import Config, load_config
from sapwood.errors import ConfigError, SapwoodError
from sapwood.model.folder import read_weights
from sapwood.train.passkey_task import DIGITS, IGNORE, KEY, QUERY, passkey_accuracy, passkey_batch


def test_passkey_sequences_hide_the_answer_at_the_asked_depth():
    gen = torch.Generator().manual_seed(0)
    length = 40
    inputs, targets = passkey_batch(length, torch.tensor([0.0, 0.5, 1.0]), gen)
    assert inputs.shape == targets.shape == (3, length)
    filler = length - 2 * DIGITS - 1
    for row, start in enumerate([0, round(0.5 * filler), filler]):
        assert inputs[row, start] == KEY and (inputs[row] == KEY).sum() == 1
        hidden = inputs[row, start + 1 : start + 1 + DIGITS]
        answer = targets[row, -DIGITS:]
        assert torch.equal(hidden, answer)
        assert (targets[row, :-DIGITS] == IGNORE).all()
        # the inputs end with QUERY and the first DIGITS - 1 answer digits (teacher forcing)
        assert inputs[row, -DIGITS] == QUERY
        assert torch.equal(inputs[row, -DIGITS + 1 :], answer[:-1])


def test_too_short_passkey_sequence_is_one_line_error():
    with pytest.raises(ConfigError, match=r"passkey sequences need at least 10 tokens; got 8"):
        passkey_batch(8, torch.tensor([0.5]), torch.Generator())


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A passkey model trained 20 steps at context 16 (plain RoPE)."""
    from sapwood.train.loop import train

    out = tmp_path_factory.mktemp("passkey")
    config = tiny_passkey_config(out / "base", trained_context=16, steps=20)
    config.train.micro_batch_size = config.train.batch_size = 16
    return Path(train(config)["final"])


def test_context_section_takes_the_checkpoints_shape_and_sets_the_scaling(base, tmp_path):
    config = extend_config(base, tmp_path / "ext", factor=4, seq_len=64, steps=1)
    saved = load_config(base).model
    assert config.model.hidden == saved.hidden and config.model.trained_context == 16
    assert config.model.rope_scaling.type == "yarn" and config.model.rope_scaling.factor == 4
    assert config.model.max_context == 64
    with pytest.raises(ConfigError, match=r"context.seq_len=128 is above the extended max_context=64"):
        load_yaml(
            tmp_path, f"context: {{init_from: {base}, rope_scaling: {{type: yarn, factor: 4}}, seq_len: 128}}"
        )
    with pytest.raises(ConfigError, match=r"context.init_from='nowhere' has no config.yaml"):
        load_yaml(
            tmp_path, "context: {init_from: nowhere, rope_scaling: {type: linear, factor: 2}, seq_len: 8}"
        )


def load_yaml(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "ext.yaml"
    path.write_text(text + "\ntrain: {task: passkey, steps: 1}\n")
    return load_config(path)


def test_extension_fine_tune_starts_from_the_checkpoint(base, tmp_path):
    """One step at a negligible learning rate: the fine-tuned weights are the base weights (a fresh init
    would be nowhere near), trained at the extended length with the new scaling saved."""
    from sapwood.train.loop import train

    config = extend_config(base, tmp_path / "ext", factor=4, seq_len=64, steps=1)
    config.train.min_lr, config.train.lr, config.train.weight_decay = 1e-10, 1e-9, 0.0
    config.train.micro_batch_size = config.train.batch_size = 4
    final = Path(train(config)["final"])
    before, after = read_weights(base), read_weights(final)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.allclose(after[name], tensor, atol=1e-6), name
    events = [json.loads(line) for line in (tmp_path / "ext" / "metrics.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if e["event"] == "context_extension"]
    assert event["seq_len"] == 64 and event["rope_scaling"]["type"] == "yarn"
    assert load_config(final).model.rope_scaling.factor == 4


def test_passkey_accuracy_is_reproducible_and_a_fraction(base):
    from sapwood.bench.context import scaled_model

    model = scaled_model(base, None, 64)
    first = passkey_accuracy(model, 64, samples=8, seed=3)
    assert first == passkey_accuracy(model, 64, samples=8, seed=3)
    assert 0.0 <= first <= 1.0


def test_eval_context_cli_prints_every_method_and_length(base):
    proc = subprocess.run(
        [
            sys.executable, "-m", "sapwood.cli", "eval-context", str(base), "--multiples", "1,4", "--methods",
            "none,yarn", "--samples", "4", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["trained_context"] == 16
    assert set(result["accuracy"]) == {"none", "yarn"}
    for row in result["accuracy"].values():
        assert set(row) == {"1", "4"} and all(0.0 <= v <= 1.0 for v in row.values())


def test_an_unknown_method_is_refused_before_any_work(base):
    with pytest.raises(
        SapwoodError,
        match=r"^method 'rope9' is not one of none, linear, ntk, yarn, dynamic_ntk, model, linear_by_length, "
        r"ntk_by_length, yarn_by_length$",
    ):
        passkey_table(base, 16, [1], ["none", "rope9"], 4.0, samples=4)


def test_by_length_policy_keeps_plain_rope_within_the_trained_context_and_stretches_as_needed():
    from sapwood.config import ModelConfig, RopeScaling
    from sapwood.infer.context import ContextPolicy
    from sapwood.model.rope import scaled_inv_freq

    cfg = ModelConfig(
        vocab_size=32, hidden=64, layers=1, heads=4, ffn=64, trained_context=32, max_context=512,
        rope_scaling=RopeScaling(type="yarn", factor=16), rope_policy="by_length",
    )
    policy = ContextPolicy(cfg)

    def want(factor: float) -> torch.Tensor:
        return scaled_inv_freq(16, cfg.rope_theta, 32, RopeScaling(type="yarn", factor=factor))[0]

    plain = scaled_inv_freq(16, cfg.rope_theta, 32, RopeScaling())[0]
    assert torch.equal(policy.rope_for(20).inv_freq, plain) and policy.rope_for(32).attention_factor == 1.0
    assert torch.equal(policy.rope_for(128).inv_freq, want(4.0))
    assert torch.equal(policy.rope_for(512).inv_freq, want(16.0))
    static = ContextPolicy(cfg.model_copy(update={"rope_policy": "static"}))
    assert torch.equal(static.rope_for(20).inv_freq, want(16.0))  # Hugging Face semantics: always stretched


def test_by_length_policy_is_refused_by_hugging_face_export_in_one_line():
    from sapwood.config import ModelConfig, RopeScaling
    from sapwood.model.hf import hf_config_from_sapwood

    cfg = ModelConfig(
        vocab_size=32, hidden=64, layers=1, heads=4, ffn=64, trained_context=32,
        rope_scaling=RopeScaling(type="yarn", factor=4), rope_policy="by_length",
    )
    with pytest.raises(SapwoodError, match=r"^model.rope_policy='by_length' has no Hugging Face equivalent"):
        hf_config_from_sapwood(cfg)
    assert (
        hf_config_from_sapwood(cfg.model_copy(update={"rope_policy": "static"}))["rope_scaling"]["factor"]
        == 4
    )


def test_mixed_lengths_fine_tune_draws_each_micro_batch_length_from_the_list(base, tmp_path):
    from sapwood.train.passkey_task import PasskeyTask

    config = extend_config(base, tmp_path / "ext", factor=4, seq_len=64, steps=1, mixed_lengths=[16, 32, 64])
    batches = PasskeyTask(config).train_batches(micro_batch_size=2)
    lengths = [next(batches)[0].shape[1] for _ in range(30)]
    assert set(lengths) == {16, 32, 64}
    again = PasskeyTask(config).train_batches(micro_batch_size=2)
    assert [next(again)[0].shape[1] for _ in range(30)] == lengths  # seeded
    single = PasskeyTask(extend_config(base, tmp_path / "one", factor=4, seq_len=64, steps=1)).train_batches(
        2
    )
    assert {next(single)[0].shape[1] for _ in range(5)} == {64}


def test_bad_mixed_lengths_are_one_line_errors(base, tmp_path):
    recipe = f"context: {{init_from: {base}, rope_scaling: {{type: yarn, factor: 4}}, seq_len: 64"
    with pytest.raises(ConfigError, match=r"context.mixed_lengths has 128: each length must be in 2..64"):
        load_yaml(tmp_path, recipe + ", mixed_lengths: [16, 128]}")
    path = tmp_path / "text.yaml"
    path.write_text(
        recipe + ", mixed_lengths: [16, 64]}\ntrain: {task: text, steps: 1}\ndata: {path: tokens}\n"
    )
    with pytest.raises(
        ConfigError, match=r"context.mixed_lengths is read by train.task passkey only, not 'text'"
    ):
        load_config(path)
