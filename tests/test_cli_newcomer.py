"""A newcomer's first hour, reproduced with the real ``sapwood`` command: config typos, output folders
that already exist, `solve` piped as YAML, `grow --to` with only the changed fields, `bench list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def sapwood(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, "-m", "sapwood.cli", *args], capture_output=True, text=True, timeout=timeout,
        env=env, cwd=cwd,
    )


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("preset: tiny\ntrain: {stepz: 10}\n", "unknown key 'train.stepz'; did you mean 'train.steps'?"),
        ("prest: tiny\n", "unknown key 'prest'; did you mean 'preset'?"),
        (
            "preset: tiny\ntrain: {steps: 10, learning_rate: 0.001}\n",
            "unknown key 'train.learning_rate'; did you mean 'train.lr'?",
        ),
    ],
)
def test_a_misspelt_key_is_reported_first_with_the_nearest_valid_key(tmp_path, yaml_text, expected):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    proc = sapwood("size", str(config))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: run.yaml: {expected}"]
    assert "Traceback" not in proc.stderr


def test_an_unknown_key_with_no_near_match_lists_the_allowed_keys(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: tiny\nparallel: {zzzz: 1}\n")
    proc = sapwood("size", str(config))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: run.yaml: unknown key 'parallel.zzzz'; allowed keys here: dp_replicate, dp_shard, tp, pp, "
        "cp, pp_schedule, pp_microbatches, cpu_offload"
    )


def test_solve_prints_one_yaml_document_with_headlines_as_comments():
    proc = sapwood("solve", "--params", "13.14e9", "--layers", "56", "--heads", "64")
    assert proc.returncode == 0, proc.stderr
    document = yaml.safe_load(proc.stdout)
    assert set(document) == {"model"}
    assert document["model"]["layers"] == 56 and document["model"]["heads"] == 64
    assert proc.stdout.startswith("# ") and "parameters" in proc.stdout.splitlines()[0]


def test_create_export_and_grow_refuse_a_non_empty_out_unless_force(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert sapwood("create", "tiny", "--out", str(ckpt)).returncode == 0
    before = (ckpt / "model.safetensors").read_bytes()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for args in (["create", "tiny"], ["export-hf", str(ckpt)], ["grow", str(ckpt), "--layers", "3"]):
        proc = sapwood(*args, "--out", str(busy))
        assert proc.returncode == 2, args
        assert proc.stderr.strip() == (
            f"error: --out {busy} already exists and is not empty; pass --force to "
            "replace it or choose another folder"
        )
        assert (busy / "notes.txt").read_text() == "mine"
    again = sapwood("create", "tiny", "--out", str(ckpt))
    assert again.returncode == 2 and (ckpt / "model.safetensors").read_bytes() == before
    forced = sapwood("export-hf", str(ckpt), "--out", str(busy), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (busy / "config.json").exists() and not (busy / "notes.txt").exists()


def test_grow_to_a_partial_model_config_names_the_grown_model(tmp_path):
    ckpt, grown = tmp_path / "ckpt", tmp_path / "grown"
    assert sapwood("create", "tiny", "--out", str(ckpt)).returncode == 0
    small = yaml.safe_load((ckpt / "config.yaml").read_text())
    target = tmp_path / "bigger.yaml"
    target.write_text(f"layers: {small['model']['layers'] + 2}\nffn: {small['model']['ffn'] + 64}\n")
    proc = sapwood("grow", str(ckpt), "--out", str(grown), "--to", str(target))
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load((grown / "config.yaml").read_text())
    assert config["model"]["layers"] == small["model"]["layers"] + 2
    assert config["model"]["ffn"] == small["model"]["ffn"] + 64
    assert config["model"]["hidden"] == small["model"]["hidden"]
    assert config["name"] == f"{small['name']}-grown"
    assert config["description"].startswith(f"Grown by `sapwood grow` from {ckpt}")


def test_bench_list_names_every_suite():
    proc = sapwood("bench", "list")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert {"model", "serve", "train", "grow", "data", "augment", "physics", "predict"} <= set(names)
    assert "list" not in names


def test_size_labels_bf16_with_its_16_bit_copy_and_uses_the_yaml_checkpointing_names():
    import json

    states = json.loads(sapwood("size", "tiny", "--json").stdout)["training_state_bytes_single_device"]
    params = json.loads(sapwood("size", "tiny", "--json").stdout)["params_total"]
    assert states["bf16+adamw"]["total"] == states["fp32+adamw"]["total"] + 2 * params
    assert states["bf16-pure+adamw8bit"]["compute_copy"] == 0
    proc = subprocess.run(
        [sys.executable, "-m", "sapwood.cli", "size", "tiny", "--checkpointing", "every_layer"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="250"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "activation_checkpointing every_layer" in proc.stdout
    assert "one device, bf16 mixed (fp32 master) + AdamW" in proc.stdout and "ckpt full" not in proc.stdout


def test_third_party_log_warnings_show_only_with_verbose():
    """The 8-bit optimizer's memory measurement imports torchao, whose import logs warnings (extension
    libraries that do not load on this machine, a torch deprecation): hidden normally, shown by --verbose."""
    args = ("size", "tiny", "--measure", "--optimizer", "adamw8bit", "--json")
    loud = sapwood("--verbose", *args)
    assert loud.returncode == 0, loud.stderr
    third_party = [line for line in loud.stderr.splitlines() if "torchao" in line or "torch/" in line]
    if not third_party:
        pytest.skip("this torch and torchao log no warning when torchao is imported")
    quiet = sapwood(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    assert json.loads(quiet.stdout)["measured"]["total"] == json.loads(loud.stdout)["measured"]["total"]


def test_size_fits_80_columns():
    proc = subprocess.run(
        [sys.executable, "-m", "sapwood.cli", "size", "tiny"], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, COLUMNS="80"),
    )
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80, proc.stdout
    assert "3,950,848" in proc.stdout
