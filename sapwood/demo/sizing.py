"""The demo's sizing stage: every preset sized in one table, then the tiny model created, loaded back
and run forward."""

from __future__ import annotations

from pathlib import Path


def sizing_stage(out: Path) -> None:
    """The sizing of every preset as one table, then the tiny model created in ``OUT/tiny``, loaded
    back and run forward."""
    import torch
    from rich.console import Console

    from sapwood.config import load_config, preset_names
    from sapwood.model import build_model, load, save_folder
    from sapwood.sizing import check_create_fits, count_params, presets_table, size_report

    console = Console()
    reports = [
        size_report(load_config(name), precision="bf16", checkpointing="full") for name in preset_names()
    ]
    console.print(presets_table(reports))
    config = load_config("tiny")
    check_create_fits(config)
    torch.manual_seed(0)
    folder = save_folder(build_model(config), config, Path(out) / "tiny")
    model = load(folder)
    tokens = torch.randint(0, config.model.vocab_size, (2, 16))
    with torch.no_grad():
        logits = model(tokens)
    console.print(
        f"created {folder} ({count_params(config.model).total:,} parameters); forward pass on "
        f"tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}, "
        f"finite: {bool(logits.isfinite().all())}"
    )
