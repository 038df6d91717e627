"""What ``sapwood size`` reports and prints, the presets table, and the ``create`` memory check."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sapwood.config import Config, ParallelConfig
from sapwood.errors import ConfigError
from sapwood.sizing.count import config_param_counts, config_param_specs
from sapwood.sizing.flops import flops_per_token
from sapwood.sizing.kv import DEFAULT_DEVICE_GB, kv_plan
from sapwood.sizing.memory import StateBytes, memory_plan, rank_state_bytes


def size_report(
    config: Config, precision: str | None = None, optimizer: str = "adamw", checkpointing: str | None = None,
    seq: int | None = None, micro_batch: int | None = None, optimizer_in_backward: bool | None = None,
    loss_chunk: int | None = None, device_gb: float = DEFAULT_DEVICE_GB,
) -> dict[str, Any]:
    """Everything ``sapwood size`` prints, as one JSON-ready mapping (memory options not given come
    from the config's ``train`` section; ``device_gb``: the serving device's memory for the KV plan)."""
    train = getattr(config, "train", None)
    precision = precision or (train.precision if train is not None else "bf16")
    if checkpointing is None:  # the training section's choice; full recomputation when there is none
        checkpointing = "none" if train is not None and train.activation_checkpointing == "none" else "full"
    checkpointing = YAML_CHECKPOINTING.get(checkpointing, checkpointing)
    micro_batch = micro_batch or (train.micro_batch_size if train is not None else 1)
    if optimizer_in_backward is None:
        optimizer_in_backward = bool(getattr(train, "optimizer_in_backward", False))
    loss_chunk = loss_chunk or getattr(train, "loss_chunk", None)
    cfg, parallel = config.model, config.parallel
    counts = config_param_counts(config)
    specs = config_param_specs(config)
    report: dict[str, Any] = {
        "name": config.name,
        "params_total": counts.total,
        "params_embedding": counts.embedding,
        "params_non_embedding": counts.non_embedding,
        "params_per_layer": counts.per_layer,
        "shape": {
            "layers": cfg.layers, "hidden": cfg.hidden, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim, "ffn": cfg.ffn, "vocab_size": cfg.vocab_size,
            "tied_embeddings": cfg.tied_embeddings, "max_context": cfg.max_context,
        },
        "parallel": {
            "dp_replicate": parallel.dp_replicate, "dp_shard": parallel.dp_shard, "tp": parallel.tp,
            "pp": parallel.pp, "cp": parallel.cp, "world_size": parallel.world_size,
        },
        "training_state_bytes_single_device": {
            f"{p}+{o}": _state_dict(
                rank_state_bytes(cfg, ParallelConfig(), p, o, specs=specs),
                compute_copy=2 * counts.total if p in ("bf16", "fp16") else 0,
            )
            for p, o in (
                ("fp32", "adamw"), ("bf16", "adamw"), ("bf16", "adamw8bit"), ("bf16-pure", "adamw8bit"),
            )
        },
    }
    if getattr(config, "cube", None) is None:
        seq = seq or cfg.trained_context
        plan = memory_plan(
            cfg, parallel, precision, optimizer, checkpointing, seq, micro_batch, optimizer_in_backward,
            loss_chunk,
        )
        report["memory_per_gpu"] = {
            **{k: v for k, v in asdict(plan).items() if k != "activation_per_layer"},
            "total": plan.total,
        }
        report["activation_bytes_per_layer"] = {k: int(v) for k, v in plan.activation_per_layer.items()}
        report["flops_per_token"] = flops_per_token(cfg, seq)
        report["seq"] = seq
        report["kv_cache"] = kv_plan(cfg, parallel, device_gb).as_dict()
    return report


def _state_dict(state: StateBytes, compute_copy: int = 0) -> dict[str, int]:
    """Bytes of one device's training state; ``compute_copy``: the 16-bit weights mixed precision casts to."""
    return {
        "weights": state.weights, "grads": state.grads, "optimizer": state.optimizer,
        "compute_copy": compute_copy, "total": state.total + compute_copy,
    }


def create_memory_bytes(config: Config) -> int:
    """RAM ``sapwood create`` needs: fp32 weights, twice (safetensors serializes a copy while writing)."""
    return 2 * 4 * config_param_counts(config).total


def check_create_fits(config: Config, available_bytes: int | None = None) -> None:
    """Refuse (one line) before anything is allocated when the model will not fit in RAM."""
    import psutil

    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    needed = create_memory_bytes(config)
    if needed > available:
        raise ConfigError(
            f"{config.name}: creating it needs {needed / 1e9:,.1f} GB of RAM "
            f"({config_param_counts(config).total:,} fp32 parameters, x2 while writing) but only "
            f"{available / 1e9:,.1f} GB is available; size it with `sapwood size` instead"
        )


def _gb(value: float) -> str:
    return f"{value / 1e9:,.2f} GB" if value >= 1e8 else f"{value / 1e6:,.2f} MB"


def print_size_report(report: dict[str, Any], console: Any = None) -> None:
    """A rich table of one :func:`size_report`."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"sapwood size: {report['name']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key in ("params_total", "params_embedding", "params_non_embedding", "params_per_layer"):
        table.add_row(key.replace("_", " "), f"{report[key]:,}")
    table.add_row("shape", ", ".join(f"{k}={v}" for k, v in report["shape"].items()))
    table.add_row("parallel", ", ".join(f"{k}={v}" for k, v in report["parallel"].items()))
    for combo, state in report["training_state_bytes_single_device"].items():
        copy = f" + 16-bit copy {_gb(state['compute_copy'])}" if state.get("compute_copy") else ""
        table.add_row(
            f"one device, {precision_label(combo)}",
            f"weights {_gb(state['weights'])} + grads "
            f"{_gb(state['grads'])} + optimizer {_gb(state['optimizer'])}{copy} = {_gb(state['total'])}",
        )
    if "memory_per_gpu" in report:
        mem = report["memory_per_gpu"]
        table.add_row(
            "activations per layer (Korthikanti)",
            ", ".join(
                f"{CHECKPOINTING_LABELS.get(k, k)} {_gb(v)}"
                for k, v in report["activation_bytes_per_layer"].items()
            ),
        )
        table.add_row(
            f"per GPU ({precision_label(mem['precision'] + '+' + mem['optimizer'])}, "
            "activation_checkpointing "
            f"{CHECKPOINTING_LABELS.get(mem['checkpointing'], mem['checkpointing'])}, "
            f"seq {mem['seq']}, micro-batch {mem['micro_batch']})",
            f"weights {_gb(mem['weights'])} + grads {_gb(mem['grads'])} + optimizer "
            f"{_gb(mem['optimizer_state'])} + 16-bit copy {_gb(mem['compute_copy'])} + activations "
            f"{_gb(mem['activations'])}, peak with max(logits {_gb(mem['logits'])}, grads) = "
            f"{_gb(mem['total'])}",
        )
        table.add_row("training FLOPs per token", f"{report['flops_per_token']:.4g}")
    if "kv_cache" in report:
        kv = report["kv_cache"]
        table.add_row(
            "KV cache per token (bf16, whole model)",
            f"{kv['bytes_per_token']:,} bytes; max_context {kv['max_context']:,} tokens = "
            f"{_gb(kv['max_context_kv_bytes_total'])}",
        )
        table.add_row(
            f"KV per device (serving tp{kv['tp']} x pp{kv['pp']}: {kv['layers_per_device']} layers x "
            f"{kv['kv_heads_per_device']} KV heads)",
            f"{kv['bytes_per_token_per_device']:,} bytes/token; {_gb(kv['device_bytes'])} device - "
            f"weights {_gb(kv['weight_bytes_per_device'])} - reserve {_gb(kv['reserve_bytes'])} = "
            f"KV budget {_gb(kv['kv_budget_bytes'])}",
        )
        verdict = "fits" if kv["max_context_fits"] else "does NOT fit"
        table.add_row(
            "longest context per device (one request)",
            f"{kv['longest_context_per_device']:,} tokens (max_context {kv['max_context']:,} {verdict})",
        )
    if "measured" in report:
        got, mem = report["measured"], report["memory_per_gpu"]
        table.add_row(
            f"measured peak (fake tensors, MemTracker, {got['seconds']:.0f} s)",
            f"params {_gb(got['params'])} + grads {_gb(got['grads'])} + optimizer {_gb(got['optimizer'])} "
            f"+ activations {_gb(got['activations'])} + temporaries {_gb(got['temporaries'])} = "
            f"{_gb(got['total'])}",
        )
        table.add_row(
            "predicted vs measured",
            f"{_gb(mem['total'])} vs {_gb(got['total'])} "
            f"({(mem['total'] - got['total']) / got['total']:+.1%})",
        )
    console.print(table)


# Korthikanti's recomputation names -> the YAML's train.activation_checkpointing values
CHECKPOINTING_LABELS = {"full": "every_layer", "selective": "selective (attention core)"}
YAML_CHECKPOINTING = {
    "every_layer": "full",
    "every_k": "full",
}  # every_k: counted as every_layer (upper bound)


def precision_label(combo: str) -> str:
    """``bf16+adamw`` -> ``bf16 mixed (fp32 master) + AdamW``: one wording for every memory figure."""
    precision, _, optimizer = combo.partition("+")
    names = {
        "fp32": "fp32", "bf16": "bf16 mixed (fp32 master)", "fp16": "fp16 mixed (fp32 master)",
        "bf16-pure": "pure bf16",
    }
    optimizers = {"adamw": "AdamW", "adamw8bit": "8-bit AdamW", "sgd": "SGD"}
    return f"{names.get(precision, precision)} + {optimizers.get(optimizer, optimizer)}"


def _bytes3(value: float) -> str:
    """Bytes with three significant digits and the unit that fits: ``63.2 MB``, ``210 GB``, ``3.36 TB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def presets_table(reports: list[dict[str, Any]]) -> Any:
    """One row per preset: exact parameter count, single-device fp32 AdamW state, per-GPU memory under the
    preset's parallel plan, FLOPs per token; fits 80 columns (the caption says what the figures assume)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="sapwood presets",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        caption="1 device: weights, grads and AdamW state in fp32 on one device. Per GPU: bf16 mixed "
        "precision + AdamW, activation checkpointing every_layer, under the preset's plan "
        "(tensor x pipeline x data parallel); '-' for cube models (no token context).",
        caption_justify="left",
    )
    table.add_column("preset", no_wrap=True)
    table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("1 device", justify="right", no_wrap=True)
    table.add_column("plan", no_wrap=True)
    table.add_column("per GPU", justify="right", no_wrap=True)
    table.add_column("FLOPs/token", justify="right", no_wrap=True)
    for r in reports:
        par = r["parallel"]
        table.add_row(
            r["name"], f"{r['params_total']:,}",
            _bytes3(r["training_state_bytes_single_device"]["fp32+adamw"]["total"]),
            f"tp{par['tp']} pp{par['pp']} dp{par['dp_replicate'] * par['dp_shard']}",
            _bytes3(r["memory_per_gpu"]["total"]) if "memory_per_gpu" in r else "-",
            f"{r['flops_per_token']:.3g}" if "flops_per_token" in r else "-",
        )
    return table
