"""``sapwood bench passkey`` and ``sapwood eval-context``: passkey retrieval past the trained length.

The bench trains a tiny model on the passkey task (:mod:`sapwood.train.passkey_task`) at a short context
with plain RoPE through the real training loop, then scores retrieval at 1x, 4x, 8x and 16x that length
(keys at evenly spaced depths) for each RoPE scaling applied without training (``none``, ``linear``,
``ntk``, ``yarn``; factor = the largest multiple), and for YaRN after the short fine-tune of the
``context:`` recipe (``sapwood train`` with ``context: {init_from, rope_scaling, seq_len}``; the
fine-tune length is 4x the trained one), and after the same fine-tune at lengths mixed from 1x, 2x and 4x
(``context.mixed_lengths``, so the trained length is not forgotten). The baseline of every row is the
same weights without scaling.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sapwood.bench.harness import Result, write_suite
from sapwood.config import Config, ContextExtension, ModelConfig, RopeScaling, TrainConfig
from sapwood.errors import SapwoodError

METHODS = ("none", "linear", "ntk", "yarn")
FINETUNED = "yarn+finetune"
FINETUNED_MIXED = "yarn+finetune mixed"  # fine-tuned at lengths 1x, 2x and 4x the trained one
ADAPTIVE = ("linear_by_length", "ntk_by_length", "yarn_by_length")  # model.rope_policy: by_length


def passkey_table(
    folder: Path, trained_context: int, multiples: list[int], methods: list[str], factor: float, samples: int,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """Accuracy per method and multiple of ``trained_context``; method ``model`` = the checkpoint's own
    scaling (e.g. after a context-extension fine-tune); ``*_by_length`` = that method under
    ``rope_policy: by_length`` (plain RoPE within the trained context, stretched only as far as needed)."""
    from sapwood.bench.context import scaled_model
    from sapwood.train.passkey_task import passkey_accuracy

    known = (*METHODS, "dynamic_ntk", "model", *ADAPTIVE)
    for method in methods:
        if method not in known:
            raise SapwoodError(f"method {method!r} is not one of {', '.join(known)}")
    table: dict[str, dict[int, float]] = {}
    for method in methods:
        kind = method.removesuffix("_by_length")
        scaling = (
            None if kind == "model" else RopeScaling(type=kind, factor=factor if kind != "none" else 1.0)
        )
        policy = "by_length" if method in ADAPTIVE else None
        table[method] = {}
        for multiple in multiples:
            length = trained_context * multiple
            model = scaled_model(folder, scaling, length, policy)
            table[method][multiple] = passkey_accuracy(model, length, samples, seed)
    return table


def tiny_passkey_config(out: Path, trained_context: int, steps: int, seed: int = 0) -> Config:
    from sapwood.train.passkey_task import VOCAB

    model = ModelConfig(
        vocab_size=VOCAB, hidden=64, layers=2, heads=4, ffn=128, trained_context=trained_context,
        tied_embeddings=True,
    )
    return Config(name="passkey", model=model, train=_train_section(out, steps, seed))


def _train_section(out: Path, steps: int, seed: int, lr: float = 5e-3) -> TrainConfig:
    return TrainConfig(
        task="passkey", steps=steps, batch_size=64, micro_batch_size=64, lr=lr, min_lr=lr / 10,
        warmup_steps=min(20, steps // 5), eval_every=steps, save_every=steps, log_every=max(1, steps // 5),
        eval_batches=2, device="cpu", out_dir=str(out), seed=seed, progress=False,
    )


def extend_config(
    base: Path, out: Path, factor: float, seq_len: int, steps: int, seed: int = 0,
    mixed_lengths: list[int] | None = None,
) -> Config:
    """The ``context:`` recipe: YaRN ``factor`` on ``base``'s weights, fine-tuned at ``seq_len`` (or at
    lengths drawn per micro-batch from ``mixed_lengths``)."""
    context = ContextExtension(
        init_from=str(base), rope_scaling=RopeScaling(type="yarn", factor=factor), seq_len=seq_len,
        mixed_lengths=mixed_lengths,
    )
    return Config.model_validate(
        {
            "name": "passkey-extended",
            "context": context.model_dump(),
            "train": _train_section(out, steps, seed, lr=1e-3).model_dump(),
        }
    )


def run_passkey_bench(
    out: Path, trained_context: int = 32, steps: int = 1000, finetune_steps: int = 100,
    multiples: list[int] | None = None, samples: int = 64, seed: int = 0,
) -> tuple[list[Result], Path]:
    """The passkey table; ``seed`` seeds the base training and both fine-tunes (the keys scored stay the
    same)."""
    from rich.console import Console

    from sapwood.train.loop import train

    console = Console()
    multiples = multiples or [1, 4, 8, 16]
    if min(multiples) < 1:
        raise SapwoodError(f"multiples {multiples}: give integers >= 1, e.g. 1,4,8,16")
    factor = float(max(multiples))
    work = Path(tempfile.mkdtemp(prefix="sapwood-bench-passkey-"))
    console.print(f"training the passkey model at context {trained_context} for {steps} steps (plain RoPE)")
    base = Path(train(tiny_passkey_config(work / "base", trained_context, steps, seed))["final"])
    table = passkey_table(base, trained_context, multiples, [*METHODS, "yarn_by_length"], factor, samples)
    finetune_len = trained_context * min(4, int(factor))
    console.print(f"fine-tuning with YaRN x{factor:g} at {finetune_len} tokens for {finetune_steps} steps")
    extended = Path(
        train(extend_config(base, work / "extended", factor, finetune_len, finetune_steps, seed))["final"]
    )
    table[FINETUNED] = passkey_table(extended, trained_context, multiples, ["model"], factor, samples)[
        "model"
    ]
    mixed = sorted({trained_context, trained_context * 2, finetune_len})
    console.print(f"fine-tuning with YaRN x{factor:g} at mixed lengths {mixed} for {finetune_steps} steps")
    extended_mixed = Path(
        train(
            extend_config(
                base, work / "extended-mixed", factor, finetune_len, finetune_steps, seed, mixed_lengths=mixed
            )
        )["final"]
    )
    table[FINETUNED_MIXED] = passkey_table(
        extended_mixed, trained_context, multiples, ["model"], factor, samples
    )["model"]
    for method, row in table.items():
        console.print(f"{method:14} " + "  ".join(f"{m}x {row[m]:.2f}" for m in multiples))
    params: dict[str, Any] = {
        "trained_context": trained_context, "factor": factor, "steps": steps,
        "finetune_steps": finetune_steps, "finetune_len": finetune_len, "finetune_mixed_lengths": mixed,
        "seed": seed, "samples": samples,
    }
    results = [
        Result(
            f"passkey {method} @{m}x", table[method][m], "accuracy", table["none"][m],
            params={**params, "eval_tokens": trained_context * m}, baseline="no scaling",
        )
        for method in table
        if method != "none"
        for m in multiples
    ]

    def plot(ax) -> None:
        for method, row in table.items():
            ax.plot(multiples, [row[m] for m in multiples], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"evaluation length / trained context ({trained_context})")
        ax.set_ylabel("passkey retrieval accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()

    path = write_suite(
        "passkey",
        results,
        out,
        plot,
        extra={
            "accuracy": table, "base": str(base), "extended": str(extended),
            "extended_mixed": str(extended_mixed),
        },
    )
    return results, path
