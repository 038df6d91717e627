"""Hugging Face interop: logits parity with transformers' LlamaForCausalLM both ways, and exact round
trips."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import sapwood  # noqa: E402
from sapwood.config import Config, ModelConfig  # noqa: E402
from sapwood.errors import SapwoodError  # noqa: E402
from sapwood.model import build_model, save_folder  # noqa: E402
from sapwood.model.folder import read_weights  # noqa: E402
from sapwood.model.hf import export_hf, import_hf  # noqa: E402

VOCAB = 97
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def small_llama(tied: bool, rope_scaling: dict | None = None) -> LlamaForCausalLM:
    """A random GQA Llama (4 query heads, 2 kv heads), built locally."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rope_scaling=rope_scaling,
        tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(config).eval()


def tokens(seq: int = 80) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))


def max_diff(hf_model: LlamaForCausalLM, ours: torch.nn.Module, seq: int = 80) -> float:
    x = tokens(seq)
    with torch.no_grad():
        return (hf_model(x).logits - ours(x)).abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
def test_hf_to_sapwood_logits_match(tmp_path, tied, rope_scaling):
    hf_model = small_llama(tied, rope_scaling)
    hf_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = sapwood.load(tmp_path / "ours")
    assert ours.cfg.kv_heads == 2 and ours.cfg.heads == 4 and ours.cfg.tied_embeddings is tied
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    # 80 positions: beyond yarn's trained context of 32, so the scaled frequencies are exercised
    assert max_diff(hf_model, ours) < 1e-4


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "scaling",
    [
        {"type": "none"}, {"type": "yarn", "factor": 8.0}, {"type": "linear", "factor": 2.0},
        {"type": "ntk", "factor": 4.0},
    ],
    ids=["none", "yarn", "linear", "ntk"],
)
def test_sapwood_to_hf_logits_match(tmp_path, tied, scaling):
    cfg = ModelConfig(vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, trained_context=16,
                      max_context=128, rope_scaling=scaling, tied_embeddings=tied)
    config = Config(name="t", model=cfg)
    torch.manual_seed(0)
    ours = build_model(config).eval()
    save_folder(ours, config, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["num_key_value_heads"] == 2 and hf_config["tie_word_embeddings"] is tied
    assert hf_config["torch_dtype"] == "float32"
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf_model, LlamaForCausalLM)
    assert max_diff(hf_model, ours) < 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_export_import_round_trip_is_bit_identical(tmp_path, tied):
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, tied_embeddings=tied,
        rope_scaling={"type": "yarn", "factor": 4.0}, trained_context=64, max_context=256,
    )
    config = Config(name="t", model=cfg)
    model = build_model(config).to(torch.bfloat16)
    save_folder(model, config, tmp_path / "a")
    export_hf(tmp_path / "a", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    import_hf(tmp_path / "hf", tmp_path / "b")
    before, after = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype == torch.bfloat16
        assert torch.equal(before[name], after[name]), name
    assert sapwood.load_config(tmp_path / "b").model == cfg.model_copy(update={"hf_model_type": "llama"})


def test_sharded_hf_checkpoint_imports(tmp_path):
    hf_model = small_llama(tied=False)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    import_hf(tmp_path / "hf", tmp_path / "ours")
    assert max_diff(hf_model, sapwood.load(tmp_path / "ours")) < 1e-4


def test_unsupported_hf_features_are_refused(tmp_path):
    hf_model = small_llama(tied=False, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(SapwoodError, match="rope type 'dynamic'"):
        import_hf(tmp_path / "hf", tmp_path / "ours")
    cfg = ModelConfig(vocab_size=VOCAB, hidden=64, layers=1, heads=4, ffn=96,
                      rope_scaling={"type": "dynamic_ntk", "factor": 4.0})
    save_folder(build_model(Config(model=cfg)), Config(model=cfg), tmp_path / "dyn")
    with pytest.raises(SapwoodError, match="dynamic_ntk"):
        export_hf(tmp_path / "dyn", tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()


def test_cli_round_trip_and_error(tmp_path):
    config = Config(name="t", model=ModelConfig(vocab_size=VOCAB, hidden=32, layers=1, heads=2, ffn=64))
    (tmp_path / "tok.json").write_text('{"model": "bpe"}')
    save_folder(build_model(config), config, tmp_path / "a", tokenizer_file=tmp_path / "tok.json")
    run = [sys.executable, "-m", "sapwood.cli"]
    subprocess.run(
        [*run, "export-hf", str(tmp_path / "a"), "--out", str(tmp_path / "hf")],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*run, "import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b")],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "b" / "model.safetensors").exists()
    assert (
        (tmp_path / "hf" / "tokenizer.json").read_text()
        == (tmp_path / "b" / "tokenizer.json").read_text()
        == ('{"model": "bpe"}')
    )
    proc = subprocess.run([*run, "import-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no config.json" in proc.stderr and "Traceback" not in proc.stderr
