"""``sapwood bench context``: perplexity past the trained context, each RoPE scaling vs none.

A tiny model is trained here with the real training loop (:mod:`sapwood.train.loop`) on the stdlib
corpus at a short context (default 64 tokens) with plain RoPE. It is then evaluated on held-out windows
of 1x, 2x, 4x and 8x that length. Each scaling method is configured as a user would to serve up to the
largest multiple (``factor`` = 8 by default): ``linear``, ``ntk`` and ``yarn`` are static (the same
frequencies at every length); ``dynamic_ntk`` stretches per request by ``length / trained_context``,
exactly as the engine's :class:`~sapwood.infer.context.ContextPolicy` does. The baseline is the same
weights with no scaling. Perplexity is over every position of each window.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sapwood.bench.harness import Result, write_suite
from sapwood.config import Config, ModelConfig, RopeScaling, TextDataConfig, TrainConfig
from sapwood.errors import SapwoodError

METHODS = ("none", "linear", "ntk", "dynamic_ntk", "yarn")


def train_short_context_model(work: Path, trained_context: int, max_multiple: int, steps: int) -> Path:
    from sapwood.data.text import stdlib_corpus, tokenize_corpus
    from sapwood.train.loop import train

    meta = tokenize_corpus(stdlib_corpus(120), work / "data", vocab_size=1024, val_fraction=0.1)
    model = ModelConfig(
        vocab_size=meta["vocab_size"], hidden=128, layers=3, heads=4, kv_heads=2, ffn=352,
        trained_context=trained_context, max_context=trained_context * max_multiple, tied_embeddings=True,
    )
    config = Config(
        name="bench-context",
        model=model,
        train=TrainConfig(
            steps=steps, batch_size=16, micro_batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20,
            device="cpu", out_dir=str(work / "run"), eval_every=steps, save_every=steps,
            log_every=max(1, steps // 10), progress=False,
        ),
        data=TextDataConfig(path=str(work / "data"), seq_len=trained_context),
    )
    summary = train(config)
    return Path(summary["final"])


def validation_windows(data: Path, length: int, count: int) -> torch.Tensor:
    """``count`` windows of ``length + 1`` tokens, evenly spaced over the validation split."""
    from sapwood.data.text import TokenShards

    tokens = np.concatenate([np.asarray(a) for a in TokenShards(data, "val").arrays]).astype(np.int64)
    if tokens.size < length + 1:
        raise SapwoodError(f"validation split has {tokens.size} tokens; need {length + 1} for one window")
    starts = np.linspace(0, tokens.size - length - 1, count).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s : s + length + 1] for s in starts]))


def scaled_model(
    folder: Path, scaling: RopeScaling | None, total_tokens: int, rope_policy: str | None = None
) -> torch.nn.Module:
    """The checkpoint's weights with ``scaling`` (None: the checkpoint's own) and ``rope_policy`` (None: the
    checkpoint's) as served to a request of ``total_tokens`` positions (per-request frequencies)."""
    from sapwood.config import load_config
    from sapwood.infer.context import ContextPolicy
    from sapwood.model.folder import read_weights
    from sapwood.model.transformer import Decoder

    cfg = load_config(folder).model
    if scaling is not None:
        cfg = cfg.model_copy(update={"rope_scaling": scaling})
    if rope_policy is not None:
        cfg = cfg.model_copy(update={"rope_policy": rope_policy})
    model = Decoder(cfg)  # built tied when configured; loading copies into the shared weight
    model.load_state_dict(read_weights(folder), strict=False)
    model.eval()
    plan = ContextPolicy(cfg).rope_for(total_tokens)
    model.inv_freq.copy_(plan.inv_freq)
    model.attention_factor = plan.attention_factor
    return model


@torch.inference_mode()
def perplexity(folder: Path, scaling: RopeScaling, windows: torch.Tensor) -> float:
    """Perplexity of the checkpoint's weights with ``scaling`` applied, as served at this length."""
    model = scaled_model(folder, scaling, windows.shape[1] - 1)
    losses = []
    for window in windows.split(4):
        logits = model(window[:, :-1])
        losses.append(
            F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten(), reduction="none")
        )
    return math.exp(torch.cat(losses).mean().item())


def run_context_bench(
    out: Path, trained_context: int = 64, steps: int = 300, multiples: list[int] | None = None,
    windows: int = 16,
) -> tuple[list[Result], Path]:
    from rich.console import Console

    console = Console()
    multiples = multiples or [2, 4, 8]
    if min(multiples) < 1:
        raise SapwoodError(f"multiples {multiples}: give integers >= 1, e.g. 2,4,8")
    factor = float(max(multiples))
    work = Path(tempfile.mkdtemp(prefix="sapwood-bench-context-"))
    console.print(f"training a tiny model at context {trained_context} for {steps} steps (plain RoPE)")
    folder = train_short_context_model(work, trained_context, int(factor), steps)
    table: dict[str, dict[int, float]] = {m: {} for m in METHODS}
    for multiple in [1, *multiples]:
        batch = validation_windows(work / "data", trained_context * multiple, windows)
        for method in METHODS:
            scaling = RopeScaling(type=method, factor=factor if method != "none" else 1.0)
            table[method][multiple] = perplexity(folder, scaling, batch)
        console.print(
            f"{multiple}x ({trained_context * multiple} tokens): "
            + ", ".join(f"{m} {table[m][multiple]:.2f}" for m in METHODS)
        )
    results = [
        Result(
            f"ppl {method} @{multiple}x",
            table[method][multiple],
            "ppl",
            table["none"][multiple],
            params={
                "trained_context": trained_context, "eval_tokens": trained_context * multiple,
                "factor": factor, "steps": steps, "windows": windows,
            },
            baseline="no scaling",
        )
        for multiple in [1, *multiples]
        for method in METHODS
        if method != "none"
    ]

    def plot(ax) -> None:
        xs = [1, *multiples]
        for method in METHODS:
            ax.plot(xs, [table[method][x] for x in xs], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"evaluation length / trained context ({trained_context})")
        ax.set_ylabel("validation perplexity")
        ax.legend()

    path = write_suite(
        "context", results, out, plot,
        extra={"perplexity": {m: table[m] for m in METHODS}, "checkpoint": str(folder)},
    )
    return results, path


def run_window_bench(
    out: Path, trained_context: int = 64, steps: int = 300, multiples: list[int] | None = None,
    window_sizes: list[int] | None = None, sinks: int = 4, windows: int = 8,
) -> tuple[list[Result], Path]:
    """Perplexity streaming with attention sinks + a sliding window (:mod:`sapwood.infer.window`, one token
    at a time, bounded cache) vs full attention on the same held-out windows, within the trained length
    (1x) and past it (full attention with no scaling; the stream's positions never pass sinks + window)."""
    from rich.console import Console

    from sapwood.infer.window import streaming_nll

    console = Console()
    multiples = multiples or [1, 4]
    window_sizes = window_sizes or [trained_context // 4, trained_context // 2]
    if min(multiples) < 1 or min(window_sizes) < 1 or sinks < 0:
        raise SapwoodError(
            f"multiples {multiples}, windows {window_sizes}, sinks {sinks}: need positive lengths"
        )
    work = Path(tempfile.mkdtemp(prefix="sapwood-bench-window-"))
    console.print(f"training a tiny model at context {trained_context} for {steps} steps (plain RoPE)")
    folder = train_short_context_model(work, trained_context, max(multiples), steps)
    model = scaled_model(folder, RopeScaling(), trained_context)
    table: dict[str, dict[int, float]] = {"full": {}}
    for multiple in multiples:
        batch = validation_windows(work / "data", trained_context * multiple, windows)
        table["full"][multiple] = perplexity(folder, RopeScaling(), batch)
        for size in window_sizes:
            nll = torch.cat([streaming_nll(model, row, sinks, size) for row in batch])
            table.setdefault(f"sinks{sinks}+window{size}", {})[multiple] = math.exp(nll.mean().item())
        console.print(
            f"{multiple}x ({trained_context * multiple} tokens): "
            + ", ".join(f"{name} {row[multiple]:.2f}" for name, row in table.items())
        )
    results = [
        Result(
            f"ppl {name} @{m}x",
            row[m],
            "ppl",
            table["full"][m],
            params={
                "trained_context": trained_context, "eval_tokens": trained_context * m, "sinks": sinks,
                "steps": steps, "windows": windows,
            },
            baseline="full attention",
        )
        for name, row in table.items()
        if name != "full"
        for m in multiples
    ]
    path = write_suite("window", results, out, extra={"perplexity": table, "checkpoint": str(folder)})
    return results, path
