"""Configs as data: presets load, YAML round-trips, and every invalid value is one line naming the field,
the value and what is allowed; the CLI shows it without a traceback and exits 2."""

import subprocess
import sys

import pytest
import yaml

from sapwood.config import Config, ModelConfig, load_config, preset_names
from sapwood.errors import ConfigError

LANGUAGE_PRESETS = ["tiny", "research-799m", "astro-13b", "enterprise-200b", "enterprise-400b"]
BASE = {"vocab_size": 64, "hidden": 32, "layers": 2, "heads": 4, "ffn": 64}


def write(tmp_path, data: dict, name: str = "bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_all_required_presets_exist_and_validate():
    assert set(LANGUAGE_PRESETS) <= set(preset_names())
    for name in preset_names():
        config = load_config(name)
        assert config.name == name and config.description


def test_enterprise_shapes_and_plans():
    for name, shape, plan in [
        ("enterprise-200b", (96, 12288, 96, 12, 49152), (8, 8, 4)),
        ("enterprise-400b", (120, 16384, 128, 16, 65536), (8, 16, 4)),
    ]:
        config = load_config(name)
        m, p = config.model, config.parallel
        assert (m.layers, m.hidden, m.heads, m.kv_heads, m.ffn) == shape
        assert (p.tp, p.pp, p.dp_shard) == plan
        assert m.max_context == 2_097_152 and m.rope_scaling.type == "yarn"
        assert m.trained_context * m.rope_scaling.factor == m.max_context


def test_head_dims_are_valid_in_language_presets():
    for name in LANGUAGE_PRESETS:
        model = load_config(name).model
        assert model.head_dim * model.heads == model.hidden and model.head_dim % 8 == 0
        assert model.heads % model.kv_heads == 0


def test_yaml_round_trip_and_preset_override(tmp_path):
    config = load_config("research-799m")
    config.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    child = write(tmp_path, {"preset": "tiny", "name": "mine", "model": {"layers": 6}}, "child.yaml")
    loaded = load_config(child)
    assert loaded.model.layers == 6 and loaded.model.hidden == load_config("tiny").model.hidden
    assert loaded.name == "mine"


@pytest.mark.parametrize(
    "model_override,expected",
    [
        ({"hidden": 100, "heads": 3}, "model: hidden=100 is not divisible by heads=3 (33.3333 per head)"),
        (
            {"heads": 4, "kv_heads": 3},
            "model: heads=4 is not divisible by kv_heads=3; kv_heads must divide heads",
        ),
        ({"hidden": -32}, "model.hidden=-32: Input should be greater than or equal to 1"),
        ({"layers": 0}, "model.layers=0: Input should be greater than or equal to 1"),
        ({"ffn": "big"}, "model.ffn='big': Input should be a valid integer"),
        ({"hiden": 32}, "unknown key 'model.hiden'"),
        (
            {"rope_scaling": {"type": "magic"}},
            "model.rope_scaling.type='magic': Input should be 'none', 'linear'",
        ),
    ],
)
def test_invalid_configs_are_one_line_errors(tmp_path, model_override, expected):
    path = write(tmp_path, {"name": "bad", "model": {**BASE, **model_override}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("bad.yaml: ")
    assert expected in message


def test_unknown_top_level_key_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(write(tmp_path, {"model": BASE, "modle": BASE}))
    with pytest.raises(ConfigError, match="unknown preset or config file 'gigantic'; presets: astro-13b"):
        load_config("gigantic")
    with pytest.raises(ConfigError, match="unknown preset or config file 'tiny-nope'"):
        load_config(write(tmp_path, {"preset": "tiny-nope", "name": "x"}))


def test_model_config_direct_validation():
    with pytest.raises(ValueError, match="hidden=4400 is not divisible by heads=64"):
        ModelConfig(**{**BASE, "hidden": 4400, "heads": 64})
    assert ModelConfig(**BASE).kv_heads == 4 and ModelConfig(**BASE).head_dim == 8
    assert Config(model=ModelConfig(**BASE)).parallel.world_size == 1


@pytest.mark.parametrize("args_of", [
    lambda p: ["size", str(p)],
    lambda p: ["create", str(p), "--out", str(p.parent / "out")],
    lambda p: ["size", "no-such-preset"],
])
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, args_of):
    path = write(tmp_path, {"name": "bad", "model": {**BASE, "hidden": 100, "heads": 3}})
    proc = subprocess.run(
        [sys.executable, "-m", "sapwood.cli", *args_of(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ")
    assert "hidden=100 is not divisible by heads=3" in proc.stderr or "unknown preset" in proc.stderr
