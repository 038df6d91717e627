"""`sapwood grow DIR --out DIR2`: per-operator options and --to CONFIG write a grown folder computing the
same logits; bad requests exit 2 with one line."""

from __future__ import annotations

import pytest
import torch
import yaml

from sapwood.cli import main
from sapwood.config import Config, validate
from sapwood.model import build_model, load, save_folder

MODEL = {
    "vocab_size": 101, "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 48, "trained_context": 16,
}


@pytest.fixture
def checkpoint(tmp_path):
    config = validate(Config, {"name": "small", "model": MODEL})
    torch.manual_seed(0)
    folder = tmp_path / "small"
    save_folder(build_model(config), config, folder)
    return folder


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def logits(folder, tokens):
    with torch.no_grad():
        return load(folder)(tokens)


def test_grow_by_options_preserves_logits(checkpoint, tmp_path, capsys):
    out = tmp_path / "grown"
    assert (
        run_cli(
            [
                "grow", str(checkpoint), "--out", str(out), "--layers", "3", "--hidden", "48", "--ffn", "64",
                "--heads", "8", "--position", "middle", "--depth-init", "stack",
            ]
        )
        == 0
    )
    grown = load(out)
    assert (grown.cfg.layers, grown.cfg.hidden, grown.cfg.ffn, grown.cfg.heads, grown.cfg.kv_heads) == (
        3, 48, 64, 8, 4,
    )
    tokens = torch.randint(0, 101, (2, 16))
    assert (logits(out, tokens) - logits(checkpoint, tokens)).abs().max() < 1e-5
    assert "params" in capsys.readouterr().out


def test_grow_to_config(checkpoint, tmp_path):
    target = tmp_path / "target.yaml"
    target.write_text(yaml.safe_dump({"model": MODEL | {"layers": 4, "hidden": 64, "head_dim": 8}}))
    out = tmp_path / "grown"
    assert run_cli(["grow", str(checkpoint), "--out", str(out), "--to", str(target)]) == 0
    assert load(out).cfg.layers == 4 and load(out).cfg.hidden == 64
    tokens = torch.randint(0, 101, (2, 16))
    assert (logits(out, tokens) - logits(checkpoint, tokens)).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "1"], "error: layers=1 is smaller than the current 2; growth can only add (use >= 2)"),
        (
            ["--heads", "6", "--kv-heads", "4"],
            "error: heads=6 is not divisible by kv_heads=4; kv_heads must divide heads",
        ),
        ([], "error: nothing to grow"),
    ],
)
def test_bad_requests_exit_2_with_one_line(checkpoint, tmp_path, capsys, args, message):
    assert run_cli(["grow", str(checkpoint), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not (tmp_path / "x").exists()
