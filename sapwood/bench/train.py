"""``sapwood bench train``: tokens/s of the sapwood training loop against a minimal nanoGPT-style loop.

Both loops train the same model (the same preset, seed and initialization) on the same token shard.
The baseline is written here in the style of nanoGPT's ``train.py``: per-row ``torch.stack`` batches
from a ``np.memmap``, autocast, ``loss.backward()``, clipping, ``AdamW.step()``. Sapwood variants:
fp32 and bf16, each with and without activation checkpointing (every layer), and optionally
``torch.compile``. Every variant runs in a fresh process so its peak memory is its own: peak RSS
growth during training on CPU (``ru_maxrss`` minus the RSS before the first step),
``torch.cuda.max_memory_allocated`` on GPU. Ratios > 1 mean sapwood is faster or uses less memory.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sapwood.bench.harness import Result, print_results, write_suite


@dataclass(frozen=True)
class TrainBenchSettings:
    preset: str = "tiny"
    seq_len: int = 128
    micro_batch_size: int = 8
    steps: int = 6
    warmup_steps: int = 1
    threads: int = 2
    device: str = "auto"
    corpus_files: int = 40
    tokens_dir: str | None = None


@dataclass(frozen=True)
class Variant:
    loop: str  # "sapwood" or "nanogpt"
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        parts = [self.precision]
        if self.activation_checkpointing:
            parts.append("act-ckpt")
        if self.compile:
            parts.append("compile")
        return " + ".join(parts)


def _config(settings: TrainBenchSettings, variant: Variant, tokens: str, out_dir: str):
    from sapwood.config import Config, raw_config, validate

    data, _ = raw_config(settings.preset)
    data["train"] = {
        "steps": 10**6, "batch_size": settings.micro_batch_size,
        "micro_batch_size": settings.micro_batch_size, "lr": 1e-3, "warmup_steps": 0,
        "precision": variant.precision, "compile": variant.compile,
        "activation_checkpointing": "every_layer" if variant.activation_checkpointing else "none",
        "device": settings.device, "out_dir": out_dir, "progress": False,
    }
    data["data"] = {"path": tokens, "seq_len": settings.seq_len}
    return validate(Config, data)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _nanogpt_loop(config, tokens: str, device, precision: str):
    """A step function in the style of nanoGPT's train.py over the same model and shard."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sapwood.model.transformer import Decoder

    torch.manual_seed(config.train.seed)
    with torch.device(device):
        model = Decoder(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    data = np.memmap(Path(tokens) / "train_00000.bin", dtype=np.uint16, mode="r")
    block, batch = config.data.seq_len, config.train.micro_batch_size
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def get_batch():
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
        return x.to(device), y.to(device)

    def step() -> int:
        x, y = get_batch()
        if dtype is None:
            logits = model(x)
        else:
            with torch.autocast(device.type, dtype=dtype):
                logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return x.numel()

    return step


def measure(settings: TrainBenchSettings, variant: Variant, tokens: str) -> dict[str, Any]:
    """Runs in a fresh process: tokens/s over ``steps`` timed steps and the training memory peak."""
    import torch

    from sapwood.bench.harness import synchronize
    from sapwood.train.loop import Trainer, resolve_device

    torch.set_num_threads(settings.threads)
    out_dir = tempfile.mkdtemp(prefix="sapwood-bench-train-")
    try:
        config = _config(settings, variant, tokens, out_dir)
        device = resolve_device(settings.device)
        if variant.loop == "sapwood":
            trainer = Trainer(config)

            def step() -> int:
                return trainer.train_step()["units"]
        else:
            step = _nanogpt_loop(config, tokens, device, variant.precision)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        base_rss = _rss_bytes()
        for _ in range(settings.warmup_steps):
            step()
        synchronize(device.type)
        start, units = time.perf_counter(), 0
        for _ in range(settings.steps):
            units += step()
        synchronize(device.type)
        elapsed = time.perf_counter() - start
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
        return {"tokens_per_s": units / elapsed, "peak_mib": peak / 2**20, "device": device.type}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _in_fresh_process(settings: TrainBenchSettings, variant: Variant, tokens: str) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, settings, variant, tokens).result()


def prepare_tokens(settings: TrainBenchSettings, scratch: Path) -> str:
    if settings.tokens_dir:
        return settings.tokens_dir
    from sapwood.config import load_config
    from sapwood.data.text import stdlib_corpus, tokenize_corpus

    vocab = load_config(settings.preset).model.vocab_size
    tokens = scratch / "tokens"
    tokenize_corpus(stdlib_corpus(settings.corpus_files), tokens, vocab_size=min(vocab, 65536))
    return str(tokens)


def run_train_bench(settings: TrainBenchSettings, out: Path, compile_variants: bool = False) -> list[Result]:
    """Measure every variant and write ``OUT/train.json`` and ``OUT/train.png``."""
    from rich.console import Console

    console = Console()
    scratch = Path(tempfile.mkdtemp(prefix="sapwood-bench-tokens-"))
    try:
        tokens = prepare_tokens(settings, scratch)
        variants = [Variant("nanogpt", "fp32"), Variant("nanogpt", "bf16")]
        for precision in ("fp32", "bf16"):
            variants += [
                Variant("sapwood", precision),
                Variant("sapwood", precision, activation_checkpointing=True),
            ]
        if compile_variants:
            variants.append(Variant("sapwood", "fp32", compile=True))
        measured: dict[Variant, dict[str, Any]] = {}
        for variant in variants:
            console.print(f"bench train: {variant.loop} {variant.label} ...")
            measured[variant] = _in_fresh_process(settings, variant, tokens)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    params = asdict(settings)
    results = []
    for variant, ours in measured.items():
        if variant.loop != "sapwood":
            continue
        baseline = measured[Variant("nanogpt", variant.precision)]
        results.append(Result(
            f"tokens/s {variant.label}", ours["tokens_per_s"], "tokens/s", baseline["tokens_per_s"],
            params={**params, **asdict(variant), "baseline": f"nanoGPT-style loop, {variant.precision}"},
            baseline="nanoGPT-style loop",
        ))
    for precision in ("fp32", "bf16"):
        full = measured[Variant("sapwood", precision)]
        checkpointed = measured[Variant("sapwood", precision, activation_checkpointing=True)]
        results.append(
            Result(
                f"training memory {precision} act-ckpt",
                checkpointed["peak_mib"],
                "MiB",
                full["peak_mib"],
                params={
                    **params,
                    "saved_mib": full["peak_mib"] - checkpointed["peak_mib"],
                    "measure": "peak RSS growth (CPU)"
                    if full["device"] == "cpu"
                    else "cuda max_memory_allocated",
                },
                baseline="sapwood without activation checkpointing",
            )
        )
    write_suite("train", results, out, extra={"raw": {f"{v.loop} {v.label}": m for v, m in measured.items()}})
    print_results(results)
    return results
