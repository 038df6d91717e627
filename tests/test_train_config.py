"""Bad training configs and inputs give one-line errors from the CLI (exit code 2, no traceback)."""

from __future__ import annotations

import pytest
import yaml

from sapwood.cli import main

MODEL = {"vocab_size": 320, "hidden": 32, "layers": 1, "heads": 4, "ffn": 64, "trained_context": 16}


def cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def run_ok(*argv: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 0


def config_file(tmp_path, tokens_dir, model=None, data="default", **train) -> str:
    content = {"model": model or dict(MODEL),
               "train": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "progress": False,
                         "out_dir": str(tmp_path / "run"), **train}}
    if data == "default":
        content["data"] = {"path": str(tokens_dir)}
    elif data is not None:
        content["data"] = data
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {}}, "missing required field 'data.path'"),
        ({"data": {"path": "/no/such/tokens"}}, "data path '/no/such/tokens' has no meta.json"),
        ({"data": None}, "needs a data section"),
        ({"batch_size": 6, "micro_batch_size": 4}, "batch_size=6 is not divisible by micro_batch_size=4"),
        (
            {"precision": "fp8"},
            "train.precision='fp8': Input should be 'fp32', 'bf16', 'fp16' or 'bf16-pure'",
        ),
        ({"activation_checkpointing": "some"}, "train.activation_checkpointing='some'"),
        ({"task": "speech"}, "train.task='speech' is unknown; registered tasks: cube, passkey, sft, text"),
        ({"lr": -1}, "train.lr=-1: Input should be greater than 0"),
        ({"model": {**MODEL, "vocab_size": 100}}, "model.vocab_size=100 is smaller than the tokenizer's"),
    ],
)
def test_bad_training_config_is_one_line(tmp_path, tokens_dir, capsys, change, message):
    change = dict(change)
    data = change.pop("data", "default")
    model = change.pop("model", None)
    err = cli_error(capsys, "train", config_file(tmp_path, tokens_dir, model=model, data=data, **change))
    assert message in err


def test_missing_train_section_and_missing_file(tmp_path, capsys):
    path = tmp_path / "model-only.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL}))
    assert "config has no train section" in cli_error(capsys, "train", str(path))
    assert "does not exist" in cli_error(capsys, "train", str(tmp_path / "nope.yaml"))
    assert "does not exist" in cli_error(
        capsys, "tokenize", str(tmp_path / "no-corpus"), "--out", str(tmp_path / "t")
    )


def test_fresh_run_refuses_to_mix_with_an_earlier_runs_checkpoints(tmp_path, tokens_dir, capsys):
    config = config_file(tmp_path, tokens_dir, save_every=1)
    run_ok("train", config)
    capsys.readouterr()
    assert "pass --resume to continue it" in cli_error(capsys, "train", config)
    run_ok("train", config, "--resume")  # nothing left to do: resumes at the last step and finishes
    assert "step=2" in capsys.readouterr().out
