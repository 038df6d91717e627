"""LoRA adapters on a :class:`~sapwood.model.transformer.Decoder`, through PEFT.

PEFT wraps sapwood's modules as they are: ``inject_adapter_in_model`` replaces the targeted ``nn.Linear``
layers (``wq`` ... ``w2``) by its ``lora.Linear`` in place, so the model stays a Decoder (same forward,
KV-cache and rotary arguments) and only the adapter weights require gradients. Several adapters can live on
one base; :func:`selecting` routes every row of a batch through its own adapter (PEFT's mixed-batch forward).

On disk an adapter is a PEFT adapter folder for the Hugging Face export of its base (``sapwood export-hf``):
``adapter_config.json`` (``target_modules`` in HF names: ``q_proj`` ...) and ``adapter_model.safetensors``
(``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` ...), so ``PeftModel.from_pretrained``
loads it on the exported model; ``base_model_name_or_path`` is the sapwood base folder it was trained on.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sapwood import fsutil
from sapwood.errors import SapwoodError
from sapwood.model.hf import hf_family, hf_to_sapwood_name, sapwood_to_hf_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
HF_TARGETS = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj",
    "w2": "down_proj",
}
_PEFT_PREFIX = "base_model.model."


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise SapwoodError(f"LoRA needs peft ({exc}); pip install peft") from None
    return peft


def peft_config(
    rank: int, alpha: float, dropout: float, targets: Sequence[str], base: str = "", hf_names: bool = False
):
    """The ``peft.LoraConfig`` of an adapter (``targets`` in sapwood names; HF names with ``hf_names``)."""
    unknown = [t for t in targets if t not in HF_TARGETS]
    if unknown:
        raise SapwoodError(
            f"lora target {unknown[0]!r} is not a linear layer of a block; allowed: {', '.join(HF_TARGETS)}"
        )
    modules = sorted(HF_TARGETS[t] for t in targets) if hf_names else sorted(targets)
    return _peft().LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=base or None,
    )


def check_family(cfg: Any) -> None:
    """PEFT adapters map one-to-one onto the exported HF model only where the export keeps q/k/v apart."""
    if hf_family(cfg) == "phi3":
        raise SapwoodError(
            "LoRA on a Phi-3 model is not supported: its Hugging Face export fuses q/k/v and gate/up, "
            "so an adapter on wq/wk/wv would not load on the exported model"
        )


def add_adapter(model: nn.Module, name: str, config) -> nn.Module:
    """Inject adapter ``name`` (a ``peft.LoraConfig`` in sapwood names) into ``model`` in place; new adapter
    weights follow PEFT's init (A Kaiming-uniform, B zero). Returns ``model``."""
    known = dict(getattr(model, "peft_config", {}) or {})
    if name in known:
        raise SapwoodError(f"adapter {name!r} is already on this model")
    with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: that is the intent
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        _peft().inject_adapter_in_model(config, model, adapter_name=name)
    model.peft_config = {**known, name: config}  # each injection keeps only its own config there
    return model


def quantize_frozen_linears(model: nn.Module) -> int:
    """Store the frozen ``nn.Linear`` weights of the blocks (the adapted layers' base layers and the others)
    as int8, weight-only with one scale per output row (torchao's ``Int8WeightOnlyConfig``); every matmul
    dequantizes them. The adapters, embedding and output head stay as they are; PEFT's ``lora.Linear`` calls
    its quantized base layer as it is. Returns how many weights were quantized."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:  # pragma: no cover - torchao is a dependency
        raise SapwoodError(f"an int8 frozen base needs torchao ({exc}); pip install torchao") from None
    chosen = {
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and name.startswith("layers.")
        and ".lora_" not in name
        and not module.weight.requires_grad
    }
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: name in chosen)
    return len(chosen)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: for a quantized tensor subclass, those of its inner tensors (int8 data,
    scales)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor.numel() * tensor.element_size()
    return sum(tensor_bytes(getattr(tensor, name)) for name in flatten()[0])


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield module_name, module


def reset_adapters(model: nn.Module) -> None:
    """Initialize every adapter's weights again (after a meta-device model was materialized with
    ``to_empty``)."""
    for _, layer in lora_layers(model):
        for name in layer.lora_A:
            layer.reset_lora_parameters(name, True)


def base_name(name: str) -> str | None:
    """The plain Decoder's name of a parameter of an adapted model; None for adapter weights."""
    if ".lora_" in name:
        return None
    return name.replace(".base_layer.", ".")


def load_base_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a plain Decoder's ``state`` into the base weights of an adapted (or plain) ``model``."""
    own = model.state_dict()
    mapped = {n: state[base_name(n)] for n in own if base_name(n) in state}
    missing = [
        n for n in own if base_name(n) is not None and base_name(n) not in state and n != "output.weight"
    ]
    if missing:
        raise SapwoodError(f"base weights lack {missing[:3]}")
    model.load_state_dict(mapped, strict=False)


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights, keyed by sapwood module names (``layers.0.attention.wq.lora_A.weight``)."""
    state = _peft().get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return {k: v.detach().contiguous() for k, v in state.items()}


def _to_hf_key(key: str) -> str:
    module, leaf = key.split(".lora_", 1)
    return f"{_PEFT_PREFIX}{sapwood_to_hf_name(module + '.weight').removesuffix('.weight')}.lora_{leaf}"


def _from_hf_key(key: str, where: Path) -> str:
    if not key.startswith(_PEFT_PREFIX) or ".lora_" not in key:
        raise SapwoodError(f"{where}: tensor {key!r} is not a LoRA weight of a causal LM")
    module, leaf = key.removeprefix(_PEFT_PREFIX).split(".lora_", 1)
    ours = hf_to_sapwood_name(module + ".weight")
    if ours is None:
        raise SapwoodError(f"{where}: tensor {key!r} has no sapwood layer")
    return f"{ours.removesuffix('.weight')}.lora_{leaf}"


def write_adapter_files(model: nn.Module, name: str, folder: Path, base: str | Path) -> None:
    """Adapter ``name`` as PEFT's two files in the existing (staging) ``folder``, for ``base``'s HF export."""
    config = model.peft_config[name]
    targets = sorted(config.target_modules)
    hf_config = peft_config(
        config.r, config.lora_alpha, config.lora_dropout, targets, str(base), hf_names=True
    )
    state = {_to_hf_key(k): v.cpu() for k, v in adapter_state(model, name).items()}
    hf_config.save_pretrained(str(folder))
    save_file(state, str(Path(folder) / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def save_adapter(model: nn.Module, name: str, out: str | Path, base: str | Path) -> Path:
    """Write adapter ``name`` as a PEFT adapter folder for ``base``'s HF export (atomic, durable)."""
    out = Path(out)
    with fsutil.staged_dir(out) as staged:
        write_adapter_files(model, name, staged, base)
    return out


def read_adapter(folder: str | Path):
    """(``peft.LoraConfig`` in sapwood names, weights keyed by sapwood names, base folder or "") of an adapter
    folder; one-line errors for what is not a LoRA adapter of a causal LM."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise SapwoodError(
            f"{folder}: not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise SapwoodError(f"{config_path}: not JSON ({exc.msg})") from None
    if raw.get("peft_type") != "LORA":
        raise SapwoodError(
            f"{config_path}: peft_type={raw.get('peft_type')!r}; only LORA adapters are supported"
        )
    ours = {v: k for k, v in HF_TARGETS.items()}
    modules = raw.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [m for m in modules if m not in ours]
    if unknown:
        raise SapwoodError(
            f"{config_path}: target module {unknown[0]!r} is not supported; allowed: {', '.join(ours)}"
        )
    for option in ("use_dora", "use_rslora"):
        if raw.get(option):
            raise SapwoodError(f"{config_path}: {option}=true is not supported")
    config = peft_config(
        int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout", 0.0)),
        [ours[m] for m in modules], raw.get("base_model_name_or_path") or "",
    )
    state = {_from_hf_key(k, folder): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    return config, state, raw.get("base_model_name_or_path") or ""


def load_adapter(model: nn.Module, folder: str | Path, name: str) -> nn.Module:
    """Add the adapter in ``folder`` to ``model`` under ``name`` (in place); returns ``model``."""
    config, state, _ = read_adapter(folder)
    add_adapter(model, name, config)
    parameter = next(model.parameters())
    state = {k: v.to(parameter.device, parameter.dtype) for k, v in state.items()}
    result = _peft().set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise SapwoodError(f"{folder}: adapter weights do not fit the base model ({unexpected[:2]})")
    expected = {k for k in model.state_dict() if f".lora_A.{name}." in k or f".lora_B.{name}." in k}
    if len(state) != len(expected):
        raise SapwoodError(
            f"{folder}: {len(state)} adapter tensors for {len(expected)} adapted weights; "
            "the adapter was trained on another model shape"
        )
    return model


def merge_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """``model`` (a plain Decoder) with the adapter in ``folder`` merged into its weights:
    ``W + (alpha / r) B A`` (PEFT's merge). Returns a plain Decoder again."""
    config, state, _ = read_adapter(folder)
    peft = _peft()
    tuner = peft.tuners.lora.LoraModel(model, config, "default")
    result = peft.set_peft_model_state_dict(model, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise SapwoodError(
            f"{folder}: adapter weights do not fit the base model ({result.unexpected_keys[:2]})"
        )
    merged = tuner.merge_and_unload()
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged


@contextlib.contextmanager
def selecting(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[None]:
    """Within it, row ``i`` of the batch goes through adapter ``adapters[i]`` (None: the base alone), in one
    forward (PEFT's mixed-batch LoRA forward groups the rows per adapter)."""
    names = [a if a is not None else BASE for a in adapters]

    def inject(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        return args, {**kwargs, "adapter_names": names}

    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for _, layer in lora_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
