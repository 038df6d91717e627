"""``sapwood grow DIR --out DIR2``: grow the model of a checkpoint folder and write the grown folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sapwood.config import ModelConfig, load_config, raw_config, validate
from sapwood.errors import SapwoodError
from sapwood.grow.plan import GrowthRequest, grow_model, params_of_shape, request_towards, shape_of
from sapwood.model import load, save_folder
from sapwood.model.transformer import Decoder


def grow_folder(
    source: str | Path, out: str | Path, request: GrowthRequest | None = None, to: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Grow the checkpoint in ``source`` by ``request`` (or towards the model of config ``to``) into ``out``.

    Returns the shapes and parameter counts before and after and the max abs logit difference on random
    tokens (0 up to float rounding for function-preserving growth).
    """
    source = Path(source)
    config = load_config(source / "config.yaml")
    model = load(source)
    if not isinstance(model, Decoder):
        raise SapwoodError(f"{source}: growth works on decoder language models, not {type(model).__name__}")
    if to is not None:
        if request is not None and any(
            getattr(request, f) is not None for f in ("layers", "hidden", "ffn", "heads")
        ):
            raise SapwoodError(
                "pass either --to CONFIG or per-operator options (--layers, --hidden, ...), not both"
            )
        base = request or GrowthRequest()
        target = request_towards(model.cfg, target_model(model.cfg, to))
        target.layer_position, target.depth_init = base.layer_position, base.depth_init
        target.function_preserving = base.function_preserving
        request = target
    if request is None:
        raise SapwoodError(
            "nothing to grow: pass --to CONFIG or at least one of --layers, --hidden, --ffn, --heads, "
            "--kv-heads"
        )
    before = model.cfg
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randint(0, before.vocab_size, (2, min(32, before.trained_context)), generator=generator)
    with torch.no_grad():
        logits_before = model(probe)
        grow_model(model, request, generator=generator)
        logits_after = model(probe)
    config.model = model.cfg
    config.name = f"{config.name}-grown"
    config.description = (
        f"Grown by `sapwood grow` from {source} ({shape_of(before)}, {params_of_shape(before):,} "
        f"parameters) to {shape_of(model.cfg)}. Before growth: {config.description}"
    ).strip()
    tokenizer = source / "tokenizer.json"
    save_folder(model, config, out, tokenizer_file=tokenizer if tokenizer.exists() else None)
    return {
        "shape_before": shape_of(before), "shape_after": shape_of(model.cfg),
        "params_before": params_of_shape(before), "params_after": params_of_shape(model.cfg),
        "max_abs_logit_diff": float((logits_after - logits_before).abs().max()),
    }


def target_model(current: ModelConfig, to: str | Path) -> ModelConfig:
    """The model shape of ``to`` (a preset, a config with ``model:``, or a YAML of model fields only),
    fields it leaves out taken from ``current``."""
    data, path = raw_config(to)
    fields = data.get("model", data)
    if not isinstance(fields, dict) or not fields:
        raise SapwoodError(f"--to {to}: no model fields; write e.g. `layers: 8` or `model: {{layers: 8}}`")
    merged = {**current.model_dump(), **fields}  # head_dim stays the checkpoint's unless given
    return validate(ModelConfig, merged, where=f"--to {path or to}: ")
