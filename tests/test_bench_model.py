"""`sapwood bench model`: the reference is the same function as the Decoder (values and gradients), and the
suite writes the shared JSON schema and a PNG. No timing is asserted."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from sapwood.bench.model import ReferenceDecoder, run_model_bench
from sapwood.config import ModelConfig
from sapwood.errors import ConfigError
from sapwood.model.transformer import Decoder


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scaling", [{"type": "none"}, {"type": "yarn", "factor": 4.0}], ids=["rope", "yarn"])
def test_reference_matches_decoder_values_and_gradients(tied, scaling):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=53, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, tied_embeddings=tied,
                      trained_context=8, max_context=32, rope_scaling=scaling)
    model = Decoder(cfg)
    reference = ReferenceDecoder(model)
    tokens = torch.randint(0, 53, (2, 24))
    ours, theirs = model(tokens), reference(tokens)
    assert (ours - theirs).abs().max().item() < 1e-5
    target = torch.randint(0, 53, (2, 24))
    F.cross_entropy(ours.flatten(0, 1), target.flatten()).backward()
    F.cross_entropy(theirs.flatten(0, 1), target.flatten()).backward()
    for name, param in model.named_parameters():
        assert (param.grad - reference.weights[name].grad).abs().max().item() < 1e-5, name


def test_suite_writes_json_and_png(tmp_path):
    preset = tmp_path / "small.yaml"
    preset.write_text(yaml.safe_dump({"name": "small", "model": {"vocab_size": 64, "hidden": 32, "layers": 1,
                                                                 "heads": 4, "kv_heads": 2, "ffn": 64}}))
    results, path = run_model_bench(tmp_path / "out", str(preset), batch=1, seq=16, repeats=1, device="cpu")
    payload = json.loads(path.read_text())
    assert path.name == "model.json" and (tmp_path / "out" / "model.png").stat().st_size > 0
    assert payload["suite"] == "model" and payload["device"].startswith("cpu")
    assert [r["name"] for r in payload["results"]] == [
        "fwd+bwd small b1 s16 float32",
        "forward small b1 s16 float32",
    ]
    for r in payload["results"]:
        assert set(r) >= {"name", "value", "unit", "baseline_value", "ratio", "params"}
        assert r["unit"] == "tokens/s" and r["value"] > 0 and r["baseline_value"] > 0
        assert r["ratio"] == pytest.approx(r["value"] / r["baseline_value"])
        assert r["params"]["logits_max_abs_diff"] < 1e-3
        assert r["value"] == pytest.approx(16 / r["params"]["ours_s"])


def test_bad_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dtype='float8'"):
        run_model_bench(tmp_path, dtype="float8")
    with pytest.raises(ConfigError, match="seq=0 must be at least 1"):
        run_model_bench(tmp_path, seq=0)
