"""Turn a sharded training checkpoint (torch.distributed.checkpoint, any world size) into a normal
sapwood checkpoint folder: ``config.yaml`` + ``model.safetensors`` (+ ``tokenizer.json``).

Runs in one process without a process group: DCP reshards the saved shards into full tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from sapwood.config import load_config
from sapwood.errors import SapwoodError
from sapwood.model.folder import build_model, materialize, save_folder


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model weights of training checkpoint folder ``checkpoint`` (``.../step_N``) to ``out``."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").exists() or not (checkpoint / "config.yaml").exists():
        raise SapwoodError(
            f"{checkpoint}: no .metadata/config.yaml; pass a training checkpoint folder (step_N)"
        )
    config = load_config(checkpoint / "config.yaml")
    with torch.device("meta"):
        model = build_model(config, "meta")
    materialize(model, "cpu")  # buffers (rope) and the tied head; every parameter is then loaded
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    set_model_state_dict(model, state["model"])
    tokenizer = None
    data = getattr(config, "data", None)
    if data is not None and (Path(data.path) / "tokenizer.json").exists():
        tokenizer = Path(data.path) / "tokenizer.json"
    return save_folder(model, config, out, tokenizer_file=tokenizer)
