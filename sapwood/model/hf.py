"""Import and export of Hugging Face Llama-family checkpoints (``config.json`` + safetensors).

The sapwood decoder is the Llama architecture with torchtitan names, and its RoPE is the rotate-half
convention HF uses, so conversion is a rename of tensors (no q/k permutation) plus a config mapping:

==========================================  ==========================================
Hugging Face                                sapwood
==========================================  ==========================================
``model.embed_tokens.weight``               ``tok_embeddings.weight``
``model.layers.N.self_attn.{q,k,v,o}_proj`` ``layers.N.attention.w{q,k,v,o}``
``model.layers.N.mlp.gate_proj``            ``layers.N.feed_forward.w1``
``model.layers.N.mlp.up_proj``              ``layers.N.feed_forward.w3``
``model.layers.N.mlp.down_proj``            ``layers.N.feed_forward.w2``
``model.layers.N.input_layernorm``          ``layers.N.attention_norm``
``model.layers.N.post_attention_layernorm`` ``layers.N.ffn_norm``
``model.norm.weight``                       ``norm.weight``
``lm_head.weight`` (absent when tied)       ``output.weight``
==========================================  ==========================================

RoPE scalings map where HF has the same function: ``linear`` -> ``linear``, ``yarn`` -> ``yarn``
(``original_max_position_embeddings`` = ``trained_context``), static ``ntk`` -> plain RoPE with the
stretched theta ``theta * factor ** (d / (d - 2))`` (the identical frequencies). ``dynamic_ntk`` has no
HF equivalent (HF's ``dynamic`` uses another stretch formula) and is refused; on import, HF types we do
not implement (``llama3``, ``longrope``, ``dynamic``) are refused. Tensors keep their dtype both ways.
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
from sapwood.config import Config, ModelConfig, RopeScaling, load_config, validate
from sapwood.errors import SapwoodError
from sapwood.model.folder import INDEX, WEIGHTS, read_weights, save_folder, write_weights
from sapwood.model.transformer import Decoder

HF_CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")

_LAYER_RENAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_RENAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_SAPWOOD_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
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
        return f"layers.{match.group(1)}.{_LAYER_RENAMES[match.group(2)]}.weight"
    raise SapwoodError(f"tensor {name!r} is not part of a Llama-family model (bias, adapter or other architecture?)")


def sapwood_to_hf_name(name: str) -> str:
    """The HF name of a sapwood tensor."""
    for hf_name, ours in _TOP_RENAMES.items():
        if name == ours:
            return hf_name
    match = _SAPWOOD_LAYER.match(name)
    inverse = {v: k for k, v in _LAYER_RENAMES.items()}
    if match and match.group(2) in inverse:
        return f"model.layers.{match.group(1)}.{inverse[match.group(2)]}.weight"
    raise SapwoodError(f"tensor {name!r} has no Hugging Face Llama equivalent")


# --- config mapping -----------------------------------------------------------------------------


def _rope_from_hf(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling, int, int]:
    """(rope_theta, scaling, trained_context, max_context) of an HF config (v4 or v5 layout)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    max_positions = int(hf.get("max_position_embeddings", 2048))
    if kind == "default":
        return theta, RopeScaling(), max_positions, max_positions
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(params["factor"])), max_positions, max_positions
    if kind == "yarn":
        for unsupported in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(unsupported) is not None:
                raise SapwoodError(f"{where}: yarn {unsupported}={params[unsupported]!r} is not supported; "
                                   "only the default attention factor 0.1*ln(factor)+1")
        if params.get("truncate", True) is False:
            raise SapwoodError(f"{where}: yarn truncate=false is not supported; only truncate=true")
        trained = int(params.get("original_max_position_embeddings") or max_positions)
        factor = float(params.get("factor") or max_positions / trained)
        scaling = RopeScaling(type="yarn", factor=factor, beta_fast=float(params.get("beta_fast") or 32.0),
                              beta_slow=float(params.get("beta_slow") or 1.0))
        return theta, scaling, trained, max(max_positions, trained)
    raise SapwoodError(f"{where}: rope type {kind!r} has no sapwood equivalent; supported: default, linear, yarn")


def config_from_hf(hf: dict[str, Any], name: str = "imported", where: str = HF_CONFIG) -> Config:
    """A validated sapwood :class:`Config` for an HF Llama-family ``config.json`` mapping."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SapwoodError(f"{where}: model_type={model_type!r} is not supported; allowed: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise SapwoodError(f"{where}: {flag}=true is not supported; sapwood linears have no bias")
    if hf.get("hidden_act", "silu") != "silu":
        raise SapwoodError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported; allowed: silu")
    if hf.get("sliding_window") is not None:
        raise SapwoodError(f"{where}: sliding_window={hf['sliding_window']!r} is not supported; allowed: null")
    theta, scaling, trained_context, max_context = _rope_from_hf(hf, where)
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    model: dict[str, Any] = {
        "vocab_size": int(hf["vocab_size"]),
        "hidden": hidden,
        "layers": int(hf["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(hf.get("num_key_value_heads") or heads),
        "ffn": int(hf["intermediate_size"]),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "trained_context": trained_context,
        "max_context": max_context,
        "rope_scaling": scaling.model_dump(),
        "tied_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }
    head_dim = hf.get("head_dim")
    if head_dim is not None and (hidden % heads or int(head_dim) != hidden // heads):
        model["head_dim"] = int(head_dim)
    return validate(Config, {"name": name, "description": f"imported from Hugging Face ({model_type})", "model": model},
                    where=f"{where}: ")


def hf_config_from_sapwood(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` mapping under which ``transformers`` builds the same function as ``cfg``."""
    scaling = cfg.rope_scaling
    theta = cfg.rope_theta
    rope_scaling: dict[str, Any] | None = None
    max_positions = cfg.max_context
    if scaling.type == "none" or (scaling.factor == 1.0 and scaling.type != "dynamic_ntk"):
        pass
    elif scaling.type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": scaling.factor}
    elif scaling.type == "ntk":
        theta = theta * scaling.factor ** (cfg.head_dim / (cfg.head_dim - 2))
    elif scaling.type == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": scaling.factor, "beta_fast": scaling.beta_fast,
                        "beta_slow": scaling.beta_slow, "original_max_position_embeddings": cfg.trained_context}
    else:
        raise SapwoodError(f"rope_scaling.type={scaling.type!r} has no Hugging Face equivalent; "
                           "exportable: none, linear, ntk, yarn")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tied_embeddings,
        "torch_dtype": _TORCH_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
        "use_cache": True,
    }


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


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert the HF Llama-family folder ``hf_dir`` into a sapwood checkpoint folder ``out``.

    Tensors are renamed, not copied or cast: the folder keeps the HF dtype.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    config_path = hf_dir / HF_CONFIG
    if not config_path.exists():
        raise SapwoodError(f"{hf_dir}: no {HF_CONFIG}; expected a Hugging Face model folder")
    config = config_from_hf(json.loads(config_path.read_text()), name=hf_dir.name, where=str(config_path))
    state = {}
    for name, tensor in read_hf_weights(hf_dir).items():
        ours = hf_to_sapwood_name(name)
        if ours is not None:
            state[ours] = tensor
    if config.model.tied_embeddings:
        state.pop("output.weight", None)
    with torch.device("meta"):
        model = Decoder(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {"output.weight"} if config.model.tied_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise SapwoodError(f"{hf_dir}: weights do not match {HF_CONFIG} (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")
    tokenizer = hf_dir / TOKENIZER
    return save_folder(model, config, out, tokenizer_file=tokenizer if tokenizer.exists() else None)


def export_hf(folder: str | Path, out: str | Path) -> Path:
    """Write the sapwood checkpoint ``folder`` as an HF folder that transformers loads as LlamaForCausalLM."""
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
    with fsutil.staged_dir(out) as staged:
        (staged / HF_CONFIG).write_text(json.dumps(hf_config, indent=2))
        write_weights(hf_state, staged)
        if (folder / TOKENIZER).exists():
            shutil.copyfile(folder / TOKENIZER, staged / TOKENIZER)
    return out
