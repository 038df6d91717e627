"""Import and export of Hugging Face checkpoints of the Llama, Mistral, Qwen2/2.5, Qwen3 and Phi-3/3.5
families (``config.json`` + safetensors + the tokenizer and generation files).

The sapwood decoder is the Llama architecture with torchtitan names, and its RoPE is the rotate-half
convention HF uses, so conversion is a rename of tensors (no q/k permutation) plus a config mapping;
Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are split on import and fused again on export:

==========================================  ==========================================
Hugging Face                                sapwood
==========================================  ==========================================
``model.embed_tokens.weight``               ``tok_embeddings.weight``
``model.layers.N.self_attn.{q,k,v,o}_proj`` ``layers.N.attention.w{q,k,v,o}`` (weight, bias)
``model.layers.N.self_attn.qkv_proj``       ``layers.N.attention.w{q,k,v}`` (rows q | k | v)
``model.layers.N.self_attn.{q,k}_norm``     ``layers.N.attention.{q,k}_norm``
``model.layers.N.mlp.gate_proj``            ``layers.N.feed_forward.w1``
``model.layers.N.mlp.up_proj``              ``layers.N.feed_forward.w3``
``model.layers.N.mlp.gate_up_proj``         ``layers.N.feed_forward.w1`` | ``w3`` (rows gate | up)
``model.layers.N.mlp.down_proj``            ``layers.N.feed_forward.w2``
``model.layers.N.input_layernorm``          ``layers.N.attention_norm``
``model.layers.N.post_attention_layernorm`` ``layers.N.ffn_norm``
``model.norm.weight``                       ``norm.weight``
``lm_head.weight`` (absent when tied)       ``output.weight``
==========================================  ==========================================

Family options (:class:`ModelConfig`): Llama ``attention_bias`` -> ``qkv_bias`` + ``attention_out_bias``,
``mlp_bias`` -> ``mlp_bias``; Qwen2 -> ``qkv_bias``; Qwen3 -> ``qk_norm`` (+ its ``attention_bias``);
``hidden_act`` -> ``activation``. Export writes the family the model was imported from
(``hf_model_type``) when that architecture computes it, else picks one from the options: ``longrope`` ->
Phi3, ``qk_norm`` -> Qwen3, q/k/v bias without output bias -> Qwen2, a sliding window -> Mistral, anything
else -> Llama.

RoPE scalings map where HF has the same function: ``linear``, ``yarn``, ``llama3`` and ``longrope`` by
name (``original_max_position_embeddings`` = ``trained_context``), static ``ntk`` -> plain RoPE with the
stretched theta ``theta * factor ** (d / (d - 2))`` (the identical frequencies). ``dynamic_ntk`` has no
HF equivalent (HF's ``dynamic`` uses another stretch formula) and is refused both ways.

Sliding-window attention (Mistral v0.1, Phi-3 4k, Qwen with ``use_sliding_window``) is
``sliding_window``, the same window on every layer.

Refused on import, each with a one-line error naming the field: other model types (Gemma 2: its
attention-logit soft-capping needs an attention path beside SDPA, its alternating window sizes per-layer
windows, its four norms per block and +1 norm offset a second block layout; that would fork the one
Decoder), a mix of windowed and full layers, ``partial_rotary_factor`` < 1, yarn ``mscale``. Tensors keep
their dtype both ways unless ``dtype`` is given.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sapwood import fsutil
from sapwood.config import FAMILY_OPTIONS, Config, ModelConfig, load_config, validate
from sapwood.errors import SapwoodError
from sapwood.model.folder import INDEX, WEIGHTS, read_weights, write_folder_files, write_weights
from sapwood.model.transformer import Decoder

HF_CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
# Files beside the weights that travel unchanged both ways (special tokens, chat template, eos ids and
# default sampling).
SIDECAR_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
)
SUPPORTED_MODEL_TYPES = tuple(FAMILY_OPTIONS)
REFUSED_MODEL_TYPES = {
    "gemma2": "its attention-logit soft-capping and alternating sliding windows need an attention path "
              "beside SDPA and its four norms per block another block layout",
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh"}
ACTIVATION_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_LAYER_RENAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP_RENAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_SAPWOOD_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --- tensor names -------------------------------------------------------------------------------


def hf_to_sapwood_name(name: str) -> str | None:
    """The sapwood name of an HF tensor; None for tensors HF stores but we do not (rotary buffers)."""
    if name in _TOP_RENAMES:
        return _TOP_RENAMES[name]
    if name.endswith("rotary_emb.inv_freq"):
        return None
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _LAYER_RENAMES:
        return f"layers.{match.group(1)}.{_LAYER_RENAMES[match.group(2)]}.{match.group(3)}"
    raise SapwoodError(
        f"tensor {name!r} is not part of a supported model family (adapter or other architecture?)"
    )


def sapwood_to_hf_name(name: str) -> str:
    """The HF name of a sapwood tensor (Llama layout: separate q/k/v and gate/up)."""
    for hf_name, ours in _TOP_RENAMES.items():
        if name == ours:
            return hf_name
    match = _SAPWOOD_LAYER.match(name)
    inverse = {v: k for k, v in _LAYER_RENAMES.items()}
    if match and match.group(2) in inverse:
        return f"model.layers.{match.group(1)}.{inverse[match.group(2)]}.{match.group(3)}"
    raise SapwoodError(f"tensor {name!r} has no Hugging Face equivalent")


def split_fused(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Phi-3's ``qkv_proj`` (rows q | k | v) and ``gate_up_proj`` (rows gate | up) as separate Llama
    tensors."""
    sizes = [cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    out = {}
    for name, tensor in state.items():
        if ".self_attn.qkv_proj." in name:
            if tensor.shape[0] != sum(sizes):
                raise SapwoodError(f"tensor {name!r} has {tensor.shape[0]} rows; config.json's heads give "
                                   f"q + k + v = {sum(sizes)}")
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes), strict=True):
                out[name.replace("qkv_proj", part)] = piece
        elif ".mlp.gate_up_proj." in name:
            gate, up = tensor.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")], out[name.replace("gate_up_proj", "up_proj")] = (
                gate,
                up,
            )
        else:
            out[name] = tensor
    return out


def fuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_fused`: Llama-layout HF tensors in Phi-3's fused layout."""
    out = {}
    for name, tensor in state.items():
        if ".self_attn.q_proj." in name:
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".mlp.gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat(
                [tensor, state[name.replace("gate_proj", "up_proj")]]
            )
        elif not any(f".{p}." in name for p in ("k_proj", "v_proj", "up_proj")):
            out[name] = tensor
    return out


# --- config mapping -----------------------------------------------------------------------------


def _rope_from_hf(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any], int, int]:
    """(rope_theta, rope_scaling mapping, trained_context, max_context) of an HF config (v4 or v5 layout);
    the mapping is validated with the rest of the model config (one-line errors naming the field)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if hf.get("model_type") == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # Phi-3's earlier names for the same method
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise SapwoodError(
            f"{where}: partial_rotary_factor={partial!r} is not supported; allowed: 1.0 (RoPE on the "
            "whole head)"
        )
    max_positions = int(hf.get("max_position_embeddings", 2048))
    trained = int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                  or max_positions)
    if kind == "default":
        return theta, {}, max_positions, max_positions
    if kind == "linear":
        return theta, {"type": "linear", "factor": params.get("factor")}, max_positions, max_positions
    if kind == "yarn":
        for unsupported in ("mscale", "mscale_all_dim"):
            if params.get(unsupported) is not None:
                raise SapwoodError(f"{where}: yarn {unsupported}={params[unsupported]!r} is not supported; "
                                   "only attention_factor or the default 0.1*ln(factor)+1")
        if params.get("truncate", True) is False:
            raise SapwoodError(f"{where}: yarn truncate=false is not supported; only truncate=true")
        scaling = {"type": "yarn", "factor": params.get("factor") or max_positions / trained,
                   "beta_fast": params.get("beta_fast") or 32.0, "beta_slow": params.get("beta_slow") or 1.0,
                   "attention_factor": params.get("attention_factor")}
    elif kind == "llama3":
        scaling = {
            "type": "llama3",
            **{k: params.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor")},
        }
    elif kind == "longrope":
        scaling = {"type": "longrope", "factor": params.get("factor") or max(1.0, max_positions / trained),
                   **{k: params.get(k) for k in ("short_factor", "long_factor", "attention_factor")}}
    else:
        raise SapwoodError(
            f"{where}: rope type {kind!r} has no sapwood equivalent; supported: default, linear, yarn, "
            "llama3, longrope"
        )
    return theta, {k: v for k, v in scaling.items() if v is not None}, trained, max(max_positions, trained)


def _sliding_window_from_hf(hf: dict[str, Any], model_type: str, where: str) -> int | None:
    """The attention window of every layer (None: full attention, or a window no shorter than the context).

    Mistral and Phi-3 read ``sliding_window``; Qwen2/Qwen3 only with ``use_sliding_window`` (on layers from
    ``max_window_layers``, or as ``layer_types`` says); Llama has no window. A mix of windowed and full layers
    is refused.
    """
    layers, window = int(hf["num_hidden_layers"]), hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return None
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        return None
    kinds = hf.get("layer_types")
    if kinds is None and model_type in ("qwen2", "qwen3"):
        first = int(hf.get("max_window_layers", layers))
        kinds = ["full_attention"] * min(first, layers) + ["sliding_attention"] * max(layers - first, 0)
    if kinds is not None:
        allowed = {"full_attention", "sliding_attention"}
        if set(kinds) - allowed or len(set(kinds)) > 1:
            odd = next((k for k in kinds if k not in allowed), "full_attention and sliding_attention")
            raise SapwoodError(
                f"{where}: layer_types with {odd!r} is not supported; allowed: all full_attention "
                "or all sliding_attention"
            )
        if kinds[0] == "full_attention":
            return None
    if int(window) >= int(hf.get("max_position_embeddings", 2048)):
        return None  # never binds within the context
    return int(window)


def _options_from_hf(hf: dict[str, Any], model_type: str, where: str) -> dict[str, Any]:
    """The ModelConfig options (biases, q/k norm, activation) of an HF family config."""
    act = hf.get("hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise SapwoodError(
            f"{where}: hidden_act={act!r} is not supported; allowed: {', '.join(HF_ACTIVATIONS)}"
        )
    options: dict[str, Any] = {**FAMILY_OPTIONS[model_type], "activation": HF_ACTIVATIONS[act]}
    if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
        options["qkv_bias"] = options["attention_out_bias"] = True
    if model_type == "llama" and hf.get("mlp_bias"):
        options["mlp_bias"] = True
    return options


def config_from_hf(hf: dict[str, Any], name: str = "imported", where: str = HF_CONFIG) -> Config:
    """A validated sapwood :class:`Config` for an HF ``config.json`` mapping of a supported family."""
    model_type = hf.get("model_type")
    if model_type in REFUSED_MODEL_TYPES:
        raise SapwoodError(
            f"{where}: model_type={model_type!r} is not supported: {REFUSED_MODEL_TYPES[model_type]}; "
            f"allowed: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SapwoodError(
            f"{where}: model_type={model_type!r} is not supported; allowed: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    options = _options_from_hf(hf, model_type, where)
    window = _sliding_window_from_hf(hf, model_type, where)
    if window is not None:
        options["sliding_window"] = window
    theta, scaling, trained_context, max_context = _rope_from_hf(hf, where)
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    model: dict[str, Any] = {
        "vocab_size": int(hf["vocab_size"]), "hidden": hidden, "layers": int(hf["num_hidden_layers"]),
        "heads": heads, "kv_heads": int(hf.get("num_key_value_heads") or heads),
        "ffn": int(hf["intermediate_size"]), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta, "trained_context": trained_context, "max_context": max_context,
        "rope_scaling": scaling, "tied_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)), "hf_model_type": model_type, **options,
    }
    head_dim = hf.get("head_dim")
    if head_dim is not None and (hidden % heads or int(head_dim) != hidden // heads):
        model["head_dim"] = int(head_dim)
    return validate(
        Config,
        {"name": name, "description": f"imported from Hugging Face ({model_type})", "model": model},
        where=f"{where}: ",
    )


def family_mismatch(family: str, cfg: ModelConfig) -> str | None:
    """Why the HF architecture ``family`` cannot compute ``cfg`` (None when it can)."""
    rope = "none" if cfg.rope_scaling.type == "ntk" else cfg.rope_scaling.type  # ntk exports as a plain theta
    if rope == "longrope" and family != "phi3":
        return "rope_scaling.type='longrope' (only Phi3 has it)"
    if cfg.qk_norm != (family == "qwen3"):
        return f"qk_norm={str(cfg.qk_norm).lower()} (only Qwen3 normalizes q and k, always)"
    if cfg.mlp_bias and family != "llama":
        return f"mlp_bias=true ({family} has no FFN bias)"
    if family == "phi3":
        if cfg.qkv_bias or cfg.attention_out_bias:
            return "qkv_bias/attention_out_bias=true (Phi3 has no attention bias)"
        if rope not in ("none", "longrope"):
            return f"rope_scaling.type={rope!r} (Phi3 has default and longrope RoPE)"
        if cfg.head_dim * cfg.heads != cfg.hidden:
            return f"head_dim={cfg.head_dim} != hidden / heads (Phi3 derives it)"
    if family == "mistral" and (cfg.qkv_bias or cfg.attention_out_bias):
        return "qkv_bias/attention_out_bias=true (Mistral has no attention bias)"
    if family == "qwen2" and (not cfg.qkv_bias or cfg.attention_out_bias):
        return (
            f"qkv_bias={str(cfg.qkv_bias).lower()}, attention_out_bias={str(cfg.attention_out_bias).lower()} "
            "(Qwen2 has q/k/v biases and no output bias)"
        )
    if family in ("llama", "qwen3") and cfg.qkv_bias != cfg.attention_out_bias:
        return (
            f"qkv_bias={str(cfg.qkv_bias).lower()} with "
            f"attention_out_bias={str(cfg.attention_out_bias).lower()} "
            f"({family}'s attention_bias sets both)"
        )
    if family == "llama" and cfg.sliding_window is not None:
        return f"sliding_window={cfg.sliding_window} (Llama attends fully)"
    return None


def hf_family(cfg: ModelConfig) -> str:
    """The HF ``model_type`` export writes: ``cfg.hf_model_type`` (set on import) when that architecture
    computes ``cfg``, else the one the options call for (see the module docstring)."""
    if cfg.hf_model_type is not None and family_mismatch(cfg.hf_model_type, cfg) is None:
        return cfg.hf_model_type
    if cfg.rope_scaling.type == "longrope":
        family = "phi3"
    elif cfg.qk_norm:
        family = "qwen3"
    elif cfg.qkv_bias and not cfg.attention_out_bias:
        family = "qwen2"
    else:
        family = "mistral" if cfg.sliding_window is not None else "llama"
    problem = family_mismatch(family, cfg)
    if problem is not None:
        raise SapwoodError(f"{problem}: no Hugging Face architecture computes this model; export refused")
    return family


def _hf_rope(cfg: ModelConfig) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) for config.json."""
    scaling, theta = cfg.rope_scaling, cfg.rope_theta
    if cfg.rope_policy != "static" and scaling.type != "none":
        raise SapwoodError(
            f"model.rope_policy={cfg.rope_policy!r} has no Hugging Face equivalent (transformers "
            "applies rope_scaling at every length); set rope_policy: static to export"
        )
    if scaling.type == "none" or (scaling.factor == 1.0 and scaling.type not in ("dynamic_ntk", "longrope")):
        return theta, None
    if scaling.type == "linear":
        return theta, {"rope_type": "linear", "factor": scaling.factor}
    if scaling.type == "ntk":
        return theta * scaling.factor ** (cfg.head_dim / (cfg.head_dim - 2)), None
    common = {"factor": scaling.factor, "original_max_position_embeddings": cfg.trained_context}
    if scaling.type == "yarn":
        rope = {"rope_type": "yarn", **common, "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}
    elif scaling.type == "llama3":
        rope = {"rope_type": "llama3", **common, "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor}
    elif scaling.type == "longrope":
        rope = {"rope_type": "longrope", **common, "short_factor": scaling.short_factor,
                "long_factor": scaling.long_factor}
    else:
        raise SapwoodError(f"rope_scaling.type={scaling.type!r} has no Hugging Face equivalent; "
                           "exportable: none, linear, ntk, yarn, llama3, longrope")
    if scaling.attention_factor is not None:
        rope["attention_factor"] = scaling.attention_factor
    return theta, rope


def hf_config_from_sapwood(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` mapping under which ``transformers`` builds the same function as ``cfg``."""
    family = hf_family(cfg)
    theta, rope_scaling = _hf_rope(cfg)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden, "intermediate_size": cfg.ffn, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": ACTIVATION_TO_HF[cfg.activation], "max_position_embeddings": cfg.max_context,
        "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps, "rope_theta": theta,
        "rope_scaling": rope_scaling, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tied_embeddings,
        "torch_dtype": _TORCH_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")), "use_cache": True,
    }
    if family in ("llama", "qwen3"):
        hf["attention_bias"] = cfg.qkv_bias
    if family == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    window = cfg.sliding_window
    if family in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                  layer_types=[("full_attention" if window is None else "sliding_attention")] * cfg.layers)
    if family in ("mistral", "phi3"):
        hf["sliding_window"] = window
    if family == "phi3":
        hf["original_max_position_embeddings"] = cfg.trained_context
        del hf["head_dim"]  # Phi3 derives it from hidden / heads (checked in hf_family)
    return hf


# --- folders ------------------------------------------------------------------------------------


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: sharded with an index, ``model.safetensors``, or any ``*.safetensors``."""
    if (folder / INDEX).exists() or (folder / WEIGHTS).exists():
        return read_weights(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SapwoodError(f"{folder}: no *.safetensors files; only safetensors checkpoints can be imported")
    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def _copy_sidecars(source: Path, target: Path) -> None:
    for name in (TOKENIZER, *SIDECAR_FILES):
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)


def import_hf(hf_dir: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Convert the HF folder ``hf_dir`` (a supported family) into a sapwood checkpoint folder ``out``.

    Tensors are renamed (Phi-3's fused ones split), not cast unless ``dtype`` (float32, bfloat16,
    float16) is given; the tokenizer, its config (special tokens, chat template) and
    ``generation_config.json`` are copied beside them.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise SapwoodError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    config_path = hf_dir / HF_CONFIG
    if not config_path.exists():
        raise SapwoodError(f"{hf_dir}: no {HF_CONFIG}; expected a Hugging Face model folder")
    config = config_from_hf(json.loads(config_path.read_text()), name=hf_dir.name, where=str(config_path))
    state = {}
    for name, tensor in split_fused(read_hf_weights(hf_dir), config.model).items():
        ours = hf_to_sapwood_name(name)
        if ours is not None:
            state[ours] = tensor if dtype is None else tensor.to(DTYPES[dtype])
    if config.model.tied_embeddings:
        state.pop("output.weight", None)
    with torch.device("meta"):
        model = Decoder(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {"output.weight"} if config.model.tied_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise SapwoodError(f"{hf_dir}: weights do not match {HF_CONFIG} (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")
    with fsutil.staged_dir(out) as staged:
        write_folder_files(model, config, staged)
        _copy_sidecars(hf_dir, staged)
    return out


def export_hf(folder: str | Path, out: str | Path) -> Path:
    """Write the sapwood checkpoint ``folder`` as an HF folder transformers loads as the family's
    ``*ForCausalLM`` (see :func:`hf_family`), with the tokenizer and generation files it came with."""
    folder, out = Path(folder), Path(out)
    if not (folder / "config.yaml").exists():
        raise SapwoodError(f"{folder}: no config.yaml; not a sapwood checkpoint folder")
    cfg = load_config(folder / "config.yaml").model
    state = read_weights(folder)
    if cfg.tied_embeddings:
        state.pop("output.weight", None)
    hf_state = {sapwood_to_hf_name(name): tensor.contiguous() for name, tensor in state.items()}
    dtypes = {t.dtype for t in hf_state.values()}
    hf_config = hf_config_from_sapwood(cfg, dtypes.pop() if len(dtypes) == 1 else torch.float32)
    generation = folder / "generation_config.json"
    special = json.loads(generation.read_text()) if generation.exists() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # null, not the family's default ids
        hf_config[key] = special.get(key)
    if hf_config["model_type"] == "phi3":
        hf_state = fuse(hf_state)
    with fsutil.staged_dir(out) as staged:
        (staged / HF_CONFIG).write_text(json.dumps(hf_config, indent=2))
        write_weights(hf_state, staged)
        _copy_sidecars(folder, staged)
    return out
