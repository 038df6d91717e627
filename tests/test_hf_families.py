"""The Hugging Face families (Llama 3.x, Llama with biases, Qwen2/2.5, Qwen3, Phi-3/3.5): tiny random models
built with transformers' own config classes, imported, served through the engine and exported back.

Each family's tiny model has a trained (original) context of 32 positions and serves 96, so the logits
are compared both inside and past the original context, where llama3 / yarn / longrope scale.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sapwood  # noqa: E402
from sapwood.config import Config, ModelConfig  # noqa: E402
from sapwood.errors import SapwoodError  # noqa: E402
from sapwood.infer import Engine, SamplingParams  # noqa: E402
from sapwood.model import build_model, save_folder  # noqa: E402
from sapwood.model.folder import read_weights  # noqa: E402
from sapwood.model.hf import export_hf, import_hf  # noqa: E402
from sapwood.sizing import SolveRequest, size_report, solve  # noqa: E402

VOCAB, TRAINED, SERVED = 97, 32, 96
SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.0 + 0.6 * i for i in range(8)]}
FAMILIES = {
    # Llama 3.2: llama3 rope scaling, tied head
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            max_position_embeddings=SERVED,
            rope_theta=5000.0,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": TRAINED,
            },
        ),
    ),
    # a Llama-family checkpoint with attention_bias and mlp_bias, GeGLU (tanh) activation
    "llama-bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            max_position_embeddings=SERVED, attention_bias=True, mlp_bias=True, hidden_act="gelu_pytorch_tanh"
        ),
    ),
    # Qwen2.5: q/k/v biases, tied head, YaRN for long context as the model cards recommend
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            max_position_embeddings=SERVED, rope_theta=1e6, tie_word_embeddings=True,
            rope_scaling={"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": TRAINED},
        ),
    ),
    # Qwen3: per-head q/k RMSNorm, head_dim independent of hidden / heads
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(max_position_embeddings=SERVED, head_dim=32)),
    # Phi-3.5: fused qkv_proj / gate_up_proj, longrope with short and long factors
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(max_position_embeddings=SERVED, original_max_position_embeddings=TRAINED, rope_scaling=LONGROPE),
    ),
    # Phi-3-mini-4k: fused tensors, plain RoPE, a sliding window shorter than the context
    "phi3-4k": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(max_position_embeddings=SERVED, original_max_position_embeddings=SERVED, sliding_window=16),
    ),
    # Mistral-7B-v0.1: sliding window
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(max_position_embeddings=SERVED, sliding_window=16),
    ),
}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 5, 7], "do_sample": True, "temperature": 0.6,
                     "top_p": 0.9}
TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages[0]['content'] }}"}


def hf_model(family: str):
    config_class, model_class, options = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**SHAPE, **options)).eval()
    with torch.no_grad():  # HF starts biases at 0 and norm gains at 1: make them matter
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (HF model, HF folder, sapwood folder), each built and imported once."""
    root = tmp_path_factory.mktemp("families")
    made = {}
    for family in FAMILIES:
        model = hf_model(family)
        model.save_pretrained(root / family / "hf")
        (root / family / "hf" / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
        (root / family / "hf" / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
        import_hf(root / family / "hf", root / family / "ours")
        made[family] = (model, root / family / "hf", root / family / "ours")
    return made


def tokens(seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))


def logits_diff(hf, ours, seq: int) -> float:
    x = tokens(seq)
    with torch.no_grad():
        return (hf(x).logits - ours(x)).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_match_transformers_inside_and_past_the_original_context(imported, family):
    hf, hf_dir, folder = imported[family]
    ours = sapwood.load(folder)
    assert logits_diff(hf, ours, 24) < 1e-4  # inside the original 32 positions (longrope: short factors)
    assert logits_diff(hf, ours, SERVED) < 1e-4  # past it (llama3 / yarn scaled; longrope: long factors)
    # the tokenizer and generation files travel with the weights
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [2, 5, 7]
    assert json.loads((folder / "tokenizer_config.json").read_text()) == TOKENIZER_CONFIG


@pytest.mark.parametrize("family", FAMILIES)
def test_size_of_an_imported_folder_is_transformers_parameter_count(imported, family):
    hf, _, folder = imported[family]
    assert size_report(sapwood.load_config(folder))["params_total"] == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_greedy_equals_transformers_generate(imported, family):
    hf, _, folder = imported[family]
    g = torch.Generator().manual_seed(3)
    short = [
        torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (14,)
    ]  # + 12 new: inside 32 (and 16)
    long = [
        torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (44,)
    ]  # beyond 32 from the prompt on
    engine = Engine(sapwood.load(folder))
    for prompts, new_tokens in ((short, 12), (long, 10)):
        requests = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0))
        for prompt, request in zip(prompts, requests, strict=True):
            ids = torch.tensor([prompt])
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
            assert request.output_ids == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_identical_logits(imported, family, tmp_path):
    hf, hf_dir, folder = imported[family]
    export_hf(folder, tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    original = json.loads((hf_dir / "config.json").read_text())
    assert exported["model_type"] == original["model_type"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded) is type(hf)
    x = tokens(SERVED)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, hf(x).logits)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == GENERATION_CONFIG
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text()) == TOKENIZER_CONFIG
    # and back: the same tensors bit for bit
    import_hf(tmp_path / "hf", tmp_path / "again")
    before, after = read_weights(folder), read_weights(tmp_path / "again")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_phi3_fused_tensors_are_split_on_import_and_fused_on_export(imported, tmp_path):
    hf, _, folder = imported["phi3"]
    state = read_weights(folder)
    layer = hf.model.layers[0]
    q, k, v = (state[f"layers.0.attention.w{n}.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), layer.self_attn.qkv_proj.weight)
    gate, up = state["layers.0.feed_forward.w1.weight"], state["layers.0.feed_forward.w3.weight"]
    assert torch.equal(torch.cat([gate, up]), layer.mlp.gate_up_proj.weight)
    export_hf(folder, tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert (
        "model.layers.1.self_attn.qkv_proj.weight" in names
        and "model.layers.1.mlp.gate_up_proj.weight" in names
    )
    assert not any("q_proj" in n or "gate_proj." in n for n in names)


def test_longrope_in_the_engine_chooses_factors_per_request(imported):
    """A request that will run past the original context uses the long factors for all its positions,
    from the prompt on; a shorter one the short factors: both equal the full forward over the final text."""
    _, _, folder = imported["phi3"]
    model = sapwood.load(folder)
    engine = Engine(model)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (10, 26)]
    for prompt, new_tokens in ((prompts[0], 8), (prompts[1], 30)):  # 18 tokens: short; 56 tokens: long
        request = engine.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0))[0]
        text = prompt + request.output_ids
        with (
            torch.no_grad()
        ):  # 17 and 55 positions: the full forward picks short / long factors as the request did
            full = model(torch.tensor([text[:-1]]))
        assert full[0, len(prompt) - 1:].argmax(-1).tolist() == request.output_ids


def test_several_eos_ids_from_generation_config_stop_the_engine(imported, tmp_path):
    """Llama 3 ends turns with any of several ids: the engine stops at the first one it generates."""
    from tokenizers import Tokenizer, models

    from sapwood.infer.tokenizer import TextTokenizer

    _, _, folder = imported["qwen3"]
    engine = Engine(sapwood.load(folder))
    prompt = [4, 8, 15, 16, 23, 42]
    free = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].output_ids
    stop_id = free[5]
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(
        str(tmp_path / "tokenizer.json")
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [VOCAB + 50, stop_id]}))
    tokenizer = TextTokenizer.from_folder(tmp_path)
    assert tokenizer.eos_ids == {VOCAB + 50, stop_id}
    stopped = Engine(engine.model, tokenizer).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0)
    )[0]
    first = free.index(stop_id)
    assert stopped.finish_reason == "stop" and stopped.output_ids == free[: first + 1]


def test_bf16_weights_keep_their_dtype_unless_asked(tmp_path):
    model = hf_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "kept")
    assert {t.dtype for t in read_weights(tmp_path / "kept").values()} == {torch.bfloat16}
    import_hf(tmp_path / "hf", tmp_path / "fp32", dtype="float32")
    assert {t.dtype for t in read_weights(tmp_path / "fp32").values()} == {torch.float32}
    export_hf(tmp_path / "kept", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(
        SapwoodError, match="dtype='int8' is not supported; allowed: float32, bfloat16, float16"
    ):
        import_hf(tmp_path / "hf", tmp_path / "bad", dtype="int8")


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_solve_counts_the_family_options_like_transformers(family):
    result = solve(
        SolveRequest(
            3e6, layers=4, heads=4, kv_heads=2, head_dim=32, vocab_size=1000, family=family, tolerance=1e-2
        )
    )
    assert result.model.qkv_bias is (family == "qwen2") and result.model.qk_norm is (family == "qwen3")
    from sapwood.model.hf import hf_config_from_sapwood

    hf_config = hf_config_from_sapwood(result.model)
    assert hf_config["model_type"] == family
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    with torch.device("meta"):
        counted = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    assert result.params == counted
    with pytest.raises(Exception, match="family='gemma2' is not known"):
        solve(SolveRequest(3e6, family="gemma2"))


REFUSALS = [
    ({"model_type": "gemma2"}, "model_type='gemma2' is not supported: its attention-logit soft-capping"),
    (
        {"model_type": "falcon"},
        "model_type='falcon' is not supported; allowed: llama, mistral, qwen2, qwen3, phi3",
    ),
    (
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
        "rope type 'dynamic' has no sapwood equivalent",
    ),
    (
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
        "layer_types with 'full_attention and sliding_attention' is not supported",
    ),
    (
        {
            "model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8,
            "layer_types": ["sliding_attention", "chunked_attention"],
        },
        "layer_types with 'chunked_attention'",
    ),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({"hidden_act": "relu2"}, "hidden_act='relu2' is not supported"),
    (
        {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "mscale": 0.7}},
        "yarn mscale=0.7 is not supported",
    ),
    (
        {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}},
        "model.rope_scaling: rope_scaling type 'llama3' needs low_freq_factor and high_freq_factor",
    ),
    (
        {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}},
        "model: rope_scaling.short_factor has 3 values; needs head_dim // 2 = 8",
    ),
]


@pytest.mark.parametrize("change,message", REFUSALS, ids=[m.split(" ")[0] for _, m in REFUSALS])
def test_refused_families_and_options_name_the_field_and_value(imported, tmp_path, change, message):
    _, hf_dir, _ = imported["llama-bias"]
    hf = {**json.loads((hf_dir / "config.json").read_text()), **change}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(SapwoodError, match=message.replace("(", r"\(")) as error:
        import_hf(tmp_path / "hf", tmp_path / "ours")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "ours").exists()


def test_export_refuses_option_combinations_without_a_transformers_architecture(tmp_path):
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden=64, layers=1, heads=4, ffn=96, qkv_bias=True, trained_context=16,
        max_context=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 2.0},
    )
    save_folder(build_model(Config(model=cfg)), Config(model=cfg), tmp_path / "ours")
    with pytest.raises(
        SapwoodError,
        match=r"qkv_bias/attention_out_bias=true \(Phi3 has no attention bias\): no "
        "Hugging Face architecture computes this model; export refused",
    ):
        export_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_size_on_an_imported_folder_and_a_refusal_in_one_line(imported, tmp_path, capsys):
    from sapwood.cli import main

    hf, hf_dir, folder = imported["phi3"]
    with pytest.raises(SystemExit) as done:
        main(["size", str(folder), "--json"])
    assert done.value.code in (0, None)
    assert json.loads(capsys.readouterr().out)["params_total"] == sum(p.numel() for p in hf.parameters())
    bad = tmp_path / "gemma"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**json.loads((hf_dir / "config.json").read_text()),
                                                 "model_type": "gemma2"}))
    with pytest.raises(SystemExit) as done:
        main(["import-hf", str(bad), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "model_type='gemma2' is not supported" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_parameter_shapes_list_every_option_tensor_in_module_order():
    from sapwood.sizing import count_params, parameter_shapes

    cfg = ModelConfig(
        vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=24, ffn=96, qkv_bias=True,
        attention_out_bias=True, mlp_bias=True, qk_norm=True, activation="gelu",
    )
    with torch.device("meta"):
        model = build_model(Config(model=cfg), "meta")
    named = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert [(s.name, s.shape) for s in parameter_shapes(cfg)] == named
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "rope,message",
    [
        (
            {"type": "llama3", "factor": 8.0},
            "rope_scaling type 'llama3' needs low_freq_factor and high_freq_factor",
        ),
        (
            {"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
            "high_freq_factor=1.0 must be above low_freq_factor=4.0",
        ),
        (
            {"type": "longrope", "short_factor": [1.0] * 8},
            "rope_scaling type 'longrope' needs short_factor and long_factor",
        ),
        (
            {"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8},
            r"rope_scaling.short_factor has 7 values; needs head_dim // 2 = 8",
        ),
    ],
)
def test_invalid_rope_options_are_one_line_errors(rope, message):
    from sapwood.config import validate
    from sapwood.errors import ConfigError

    model = dict(vocab_size=VOCAB, hidden=64, layers=1, heads=4, ffn=96, rope_scaling=rope)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        validate(Config, {"model": model})
    assert "\n" not in str(error.value)


# Shape fields of the published config.json files (rope factors of Phi-3.5 abbreviated: they do not change
# counts) and the parameter counts their model cards state.
PUBLISHED = {
    "Llama-3.2-1B": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        attention_bias=False,
        mlp_bias=False,
        rope_scaling={
            "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
    ),
    "Qwen2.5-0.5B": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        sliding_window=32768, use_sliding_window=False, max_window_layers=24, tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
    "Qwen3-0.6B": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, sliding_window=None, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=True, rms_norm_eps=1e-6, attention_bias=False,
    ),
    "Phi-3.5-mini": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_theta=10000.0, sliding_window=262144,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
        tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=32000,
    ),
}
PUBLISHED_TOTALS = {"Llama-3.2-1B": 1_235_814_400, "Qwen2.5-0.5B": 494_032_768, "Qwen3-0.6B": 596_049_920,
                    "Phi-3.5-mini": 3_821_079_552}


@pytest.mark.parametrize("name", PUBLISHED)
def test_size_of_published_family_configs_equals_transformers_on_meta(name):
    from sapwood.model.hf import config_from_hf
    from sapwood.sizing import count_params

    hf = PUBLISHED[name]
    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    assert count_params(config_from_hf(hf).model).total == theirs == PUBLISHED_TOTALS[name]


@pytest.mark.parametrize("depth_init", ["identity", "stack"])
def test_depth_growth_of_a_family_model_preserves_its_function_and_width_growth_is_refused(
    imported, depth_init
):
    from sapwood.grow.plan import GrowthRequest, grow_model

    model = sapwood.load(imported["llama-bias"][2])  # q/k/v/o and FFN biases, GeGLU
    x = tokens(40)
    with torch.no_grad():
        before = model(x)
        grow_model(model, GrowthRequest(layers=4, depth_init=depth_init))
        assert (model(x) - before).abs().max().item() < 1e-5
    with pytest.raises(
        SapwoodError, match="ffn=128: width growth of a model with qkv_bias=true is not supported"
    ):
        grow_model(model, GrowthRequest(ffn=128))
    qwen3 = sapwood.load(
        imported["qwen3"][2]
    )  # q/k norms: new blocks get unit gains, not uninitialized memory
    with torch.no_grad():
        before = qwen3(x)
        grow_model(qwen3, GrowthRequest(layers=3, depth_init=depth_init))
        assert (qwen3(x) - before).abs().max().item() < 1e-5


# The chat templates published in the tokenizer_config.json of Meta-Llama-3-8B-Instruct and
# Phi-3-mini-4k-instruct: they use bos_token / eos_token, which transformers passes to the template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
    "%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] "
    "+ "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% "
    "endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, PHI3_TEMPLATE], ids=["llama3", "phi3"])
def test_chat_template_renders_with_special_tokens_as_transformers_does(tmp_path, template):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from sapwood.infer.tokenizer import TextTokenizer

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "there": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(
        [AddedToken("<|begin_of_text|>", special=True), AddedToken("<|eot_id|>", special=True)]
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
                "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
                "eos_token": "<|eot_id|>",
            }
        )
    )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hello there "}]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    ours = TextTokenizer.from_folder(tmp_path).apply_chat_template(messages)
    assert ours == theirs
    if template is LLAMA3_TEMPLATE:
        assert ours.startswith("<|begin_of_text|><|start_header_id|>system")


def test_served_requests_take_generation_config_sampling_defaults_for_unset_fields(lm_folder, tmp_path):
    """A real server: a request leaving temperature unset gets generation_config.json's (0 here: greedy);
    one that sets it keeps its own."""
    import shutil

    import httpx

    from sapwood.serve.app import create_app
    from sapwood.serve.server import BackgroundServer
    from sapwood.serve.settings import ServeSettings

    folder = tmp_path / "model"
    shutil.copytree(lm_folder, folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "temperature": 0.0, "top_k": 20})
    )
    engine = Engine.from_folder(folder)
    assert engine.sampling_defaults == {"temperature": 0.0, "top_k": 20}
    prompt = "def parse(text):\n    "
    greedy = engine.generate([engine.tokenizer.encode(prompt)], SamplingParams(16, temperature=0))[
        0
    ].stream.text
    settings = ServeSettings(max_batch=4)
    with BackgroundServer(create_app(folder, settings, api_keys=frozenset()), settings) as server:
        body = {"model": "model", "prompt": prompt, "max_tokens": 16, "seed": 3}
        unset = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        explicit = httpx.post(
            f"{server.url}/v1/completions", json={**body, "temperature": 1.0}, timeout=60
        ).json()
    assert unset["choices"][0]["text"] == greedy
    assert explicit["choices"][0]["text"] != greedy
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 7.0}))
    with pytest.raises(SapwoodError, match=r"generation_config.json: temperature=7.0: must be in \[0, 2\]"):
        Engine.from_folder(folder)


def test_solve_follows_qwen3_head_dim_rule_to_the_published_shape():
    """Qwen3-0.6B: head_dim 128 with hidden 1024 and 16 heads (q/k/v wider than hidden)."""
    result = solve(SolveRequest(596_049_920, layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128,
                                vocab_size=151936, tied_embeddings=True, family="qwen3"))
    assert result.params == PUBLISHED_TOTALS["Qwen3-0.6B"] and result.error == 0
    assert (result.model.ffn, result.model.head_dim, result.model.qk_norm) == (3072, 128, True)
    with pytest.raises(Exception, match="hidden=1024 with heads=16 gives head_dim=64"):
        solve(SolveRequest(596_049_920, layers=28, hidden=1024, heads=16, head_dim=128, family="llama"))


def test_qwen2_with_use_sliding_window_on_every_layer_round_trips(tmp_path):
    config = transformers.Qwen2Config(**SHAPE, max_position_embeddings=SERVED, use_sliding_window=True,
                                      sliding_window=16, max_window_layers=0)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = sapwood.load(tmp_path / "ours")
    assert ours.cfg.sliding_window == 16
    assert logits_diff(hf, ours, SERVED) < 1e-4
    export_hf(tmp_path / "ours", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    x = tokens(SERVED)
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)


def test_tensor_parallel_refuses_qk_norm_in_one_line():
    from sapwood.config import ParallelConfig
    from sapwood.errors import ConfigError
    from sapwood.train.mesh import ParallelDims
    from sapwood.train.parallel import check_parallel_fits_model

    cfg = ModelConfig(vocab_size=96, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, qk_norm=True)
    with pytest.raises(ConfigError, match="model.qk_norm=true with parallel.tp=2 is not supported"):
        check_parallel_fits_model(cfg, ParallelDims(ParallelConfig(tp=2), 2))
    check_parallel_fits_model(cfg, ParallelDims(ParallelConfig(dp_shard=2), 2))
    check_parallel_fits_model(cfg.model_copy(update={"qk_norm": False, "qkv_bias": True}),
                              ParallelDims(ParallelConfig(tp=2), 2))
