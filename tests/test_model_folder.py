import subprocess
import sys

import torch

import sapwood
from sapwood.model import build_model, save_folder


def test_create_and_load_roundtrip(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config)
    save_folder(model, tiny_config, tmp_path / "ckpt")
    loaded = sapwood.load(tmp_path / "ckpt")
    tokens = torch.randint(0, tiny_config.model.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    assert loaded.output.weight is loaded.tok_embeddings.weight


def test_sharded_folder_roundtrip(tmp_path, tiny_config):
    model = build_model(tiny_config)
    save_folder(model, tiny_config, tmp_path / "ckpt", max_shard_bytes=1_000_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    loaded = sapwood.load(tmp_path / "ckpt")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_unknown_preset_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sapwood.cli", "create", "nope", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown preset" in proc.stderr
