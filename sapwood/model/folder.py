"""The sapwood checkpoint folder: ``config.yaml`` + ``model.safetensors`` (sharded when large) +
``tokenizer.json`` when there is one.

Shards follow the Hugging Face convention (``model-00001-of-00003.safetensors`` and
``model.safetensors.index.json``). Writes are atomic and durable: everything goes to a sibling
``OUT.partial-PID`` folder that is fsynced and renamed into place (:mod:`sapwood.fsutil`), so a failed
or killed write leaves any previous folder intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sapwood import fsutil
from sapwood.config import Config, load_config
from sapwood.errors import SapwoodError
from sapwood.model.transformer import Decoder, tie_head

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors to save: contiguous, with the tied head left out (it is the embedding)."""
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if getattr(getattr(model, "cfg", None), "tied_embeddings", False):
        state.pop("output.weight", None)
    return state


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_weights(
    state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> None:
    """Write ``state`` as one safetensors file, or HF-style shards with an index above the limit."""
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Read a single or sharded safetensors checkpoint from ``folder``."""
    if (folder / INDEX).exists():
        files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    elif (folder / WEIGHTS).exists():
        files = [WEIGHTS]
    else:
        raise SapwoodError(f"{folder}: no {WEIGHTS} or {INDEX}; not a checkpoint folder")
    state = {}
    for filename in files:
        with safe_open(str(folder / filename), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def save_folder(
    model: torch.nn.Module, config: Config, out: str | Path, tokenizer_file: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a checkpoint folder atomically and durably (:func:`sapwood.fsutil.staged_dir`); return its
    path."""
    out = Path(out)
    with fsutil.staged_dir(out) as staged:
        write_folder_files(model, config, staged, tokenizer_file, max_shard_bytes)
    return out


def write_folder_files(
    model: torch.nn.Module, config: Config, folder: Path, tokenizer_file: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """The files of a checkpoint folder, written into the existing (staging) ``folder``."""
    config.save(folder / "config.yaml")
    write_weights(weights_state_dict(model), folder, max_shard_bytes)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, folder / "tokenizer.json")


def materialize(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Give a model built on the meta device real storage on ``device`` and initialize it:
    ``to_empty`` -> tie the head again (``to_empty`` unties shared parameters) -> ``init_weights``
    (which also sets buffers such as the rotary frequencies). Returns ``model``."""
    model.to_empty(device=device)
    tie_head(model)
    with torch.no_grad():
        model.init_weights()
    return model


def build_model(config: Config, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An initialized model for ``config`` (the model kind is chosen here, in one place)."""
    with torch.device(device):
        if getattr(config, "cube", None) is not None:  # a datacube surrogate
            from sapwood.model.cube import CubeSurrogate

            return CubeSurrogate(config.model, config.cube)
        return Decoder(config.model)


def load(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """The model stored in a checkpoint folder, in eval mode."""
    folder = Path(folder)
    if not (folder / "config.yaml").exists():
        raise SapwoodError(f"{folder}: no config.yaml; not a sapwood checkpoint folder")
    config = load_config(folder / "config.yaml")
    with torch.device("meta"):
        model = build_model(config, "meta")
    state = read_weights(folder)
    materialize(model, device)  # buffers (rope) and the tied head come from here, not from the file
    if config.model.tied_embeddings:
        state.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"output.weight"} if config.model.tied_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise SapwoodError(
            f"{folder}: weights do not match config.yaml (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if dtype is not None:
        model.to(dtype)
    return model.eval()
