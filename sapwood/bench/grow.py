"""``sapwood bench grow``: training FLOPs (and wall time) to reach a target validation loss.

Model L (the larger shape) trained from scratch is the baseline. Against it, a small model S is trained
for ``grow_fraction`` of the steps and grown into L, then trained on, with

- ``ours``: function-preserving growth (zero-initialized new outputs, rescaled norms, identity blocks);
- ``stacking``: the same width growth, depth by copying blocks with their outputs (G_stack);
- ``random``: the same shapes, every new part randomly initialized (outputs jump).

All runs see the same token stream (text of the Python standard library, BPE-tokenized here), the same
optimizer (AdamW, the trainer's parameter groups) and LR (linear warm-up, then constant, so a run may go
on past the baseline's length). The target is the baseline's validation loss at its last step; a run's
cost is the training FLOPs (``sapwood.sizing.flops_per_token`` of the shape at each step, times tokens)
and seconds spent until its validation loss first reaches the target. Results are ratios baseline/run.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from sapwood.bench.harness import Result, print_results, write_suite
from sapwood.config import ModelConfig
from sapwood.data.text import TokenShards, WindowLoader, stdlib_corpus, tokenize_corpus
from sapwood.grow.plan import GrowthRequest, grow_model
from sapwood.model.transformer import Decoder
from sapwood.sizing import flops_per_token

console = Console()

VARIANTS = {
    "ours": {"depth_init": "identity", "function_preserving": True},
    "stacking": {"depth_init": "gstack", "function_preserving": True},
    "random": {"depth_init": "random", "function_preserving": False},
}


@dataclass
class BenchSettings:
    steps: int = 200
    grow_fraction: float = 0.3
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    eval_every: int = 10
    eval_batches: int = 4
    max_steps_factor: float = 1.5  # grown runs may train this much longer than the baseline to reach it
    scale: float = 1.0
    seed: int = 0
    vocab_size: int = 512


def shapes(settings: BenchSettings, vocab_size: int) -> tuple[ModelConfig, ModelConfig]:
    """(small S, large L): L has twice the layers, width, heads, kv heads and FFN of S (same head_dim)."""
    width = max(32, int(32 * settings.scale) // 16 * 16)
    head_dim = 16 if width < 128 else 32
    common = {"vocab_size": vocab_size, "head_dim": head_dim, "trained_context": settings.seq_len,
              "tied_embeddings": True}
    small = ModelConfig(hidden=width, layers=2, heads=width // head_dim, kv_heads=max(1, width // (2 * head_dim)),
                        ffn=3 * width, **common)
    large = ModelConfig(hidden=2 * width, layers=4, heads=2 * small.heads, kv_heads=2 * small.kv_heads,
                        ffn=6 * width, **common)
    return small, large


@dataclass
class RunCurve:
    name: str
    flops: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    growth_step: int | None = None
    loss_jump: float | None = None  # val loss right after growth minus right before

    def first_reaching(self, target: float) -> tuple[float, float, int] | None:
        for flops, seconds, step, loss in zip(self.flops, self.seconds, self.steps, self.val_loss, strict=True):
            if loss <= target:
                return flops, seconds, step
        return None


def _optimizer(model: Decoder, lr: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def _val_loss(model: Decoder, batches: list, device: torch.device) -> float:
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x.to(device)).float().flatten(0, 1), y.to(device).flatten()).item()
                  for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def train_curve(name: str, start: ModelConfig, final: ModelConfig, settings: BenchSettings, data: Path,
                device: torch.device, max_steps: int, grow_at: int | None = None, variant: dict | None = None,
                target: float | None = None) -> RunCurve:
    """Train from ``start`` (grown into ``final`` after step ``grow_at``) and record the validation curve;
    stops early once ``target`` is reached."""
    torch.manual_seed(settings.seed)
    model = Decoder(start).to(device)
    optimizer = _optimizer(model, settings.lr)
    warmup = settings.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    loader = WindowLoader(TokenShards(data, "train"), settings.seq_len, settings.batch_size, settings.seed)
    val_batches = WindowLoader(TokenShards(data, "val"), settings.seq_len, settings.batch_size,
                               settings.seed).fixed_batches(settings.eval_batches)
    tokens_per_step = settings.batch_size * settings.seq_len
    curve = RunCurve(name)
    flops, seconds = 0.0, 0.0
    for step in range(1, max_steps + 1):
        started = time.perf_counter()
        inputs, targets = next(loader)
        loss = F.cross_entropy(model(inputs.to(device)).float().flatten(0, 1), targets.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        flops += flops_per_token(model.cfg, settings.seq_len) * tokens_per_step
        if step == grow_at:
            before = _val_loss(model, val_batches, device)
            started = time.perf_counter()
            request = GrowthRequest(layers=final.layers, hidden=final.hidden, ffn=final.ffn, heads=final.heads,
                                    kv_heads=final.kv_heads, layer_position="evenly", **(variant or {}))
            generator = torch.Generator(device=device).manual_seed(settings.seed + 1)
            grow_model(model, request, optimizer, generator=generator)
            seconds += time.perf_counter() - started
            curve.growth_step = step
            curve.loss_jump = _val_loss(model, val_batches, device) - before
        if step % settings.eval_every == 0 or step == max_steps:
            curve.flops.append(flops)
            curve.seconds.append(seconds)
            curve.steps.append(step)
            curve.val_loss.append(_val_loss(model, val_batches, device))
            if target is not None and curve.val_loss[-1] <= target:
                break
    return curve


def prepare_tokens(folder: Path, vocab_size: int, max_files: int = 120) -> Path:
    if not (folder / "meta.json").exists():
        tokenize_corpus(stdlib_corpus(max_files=max_files), folder, vocab_size=vocab_size, val_fraction=0.1)
    return folder


def run_grow_bench(out: Path, steps: int = 200, target_loss: float | None = None, scale: float = 1.0,
                   seed: int = 0, grow_fraction: float = 0.3, data_dir: Path | None = None,
                   max_files: int = 120) -> Path:
    settings = BenchSettings(steps=steps, scale=scale, seed=seed, grow_fraction=grow_fraction)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_tokens(Path(data_dir or tmp) / "tokens", settings.vocab_size, max_files)
        vocab = int(__import__("json").loads((data / "meta.json").read_text())["vocab_size"])
        small, large = shapes(settings, vocab)
        console.print(f"S: {small.layers}x{small.hidden} ({_params(small):,} params) -> "
                      f"L: {large.layers}x{large.hidden} ({_params(large):,} params), {steps} steps, {device}")
        torch.set_flush_denormal(True)  # tiny CPU models otherwise spend time in denormal arithmetic
        try:
            curves, target = _run_variants(settings, data, device, small, large, steps, target_loss)
        finally:
            torch.set_flush_denormal(False)  # process-global CPU state: leave it as we found it
    results = _results(curves, target, settings, small, large)
    print_results(results)
    extra = {"target_val_loss": target, "curves": [c.__dict__ for c in curves],
             "small": small.model_dump(), "large": large.model_dump()}
    return write_suite("grow", results, out, plot=lambda ax: _plot(ax, curves, target), extra=extra)


def _run_variants(settings, data, device, small, large, steps, target_loss):
    """Scratch first (it sets the target), then each growth variant towards that target."""
    for shape in (small, large):  # untimed warm-up of kernels and allocator, so the first run pays nothing extra
        train_curve("warm-up", shape, shape, settings, data, device, 20)
    scratch = train_curve("scratch", large, large, settings, data, device, steps)
    target = target_loss if target_loss is not None else scratch.val_loss[-1]
    console.print(f"scratch: val loss {scratch.val_loss[-1]:.4f} after {steps} steps; target {target:.4f}")
    grow_at = max(1, int(settings.grow_fraction * steps))
    max_steps = int(settings.max_steps_factor * steps)
    curves = [scratch]
    for name, variant in VARIANTS.items():
        curve = train_curve(name, small, large, settings, data, device, max_steps, grow_at, variant, target)
        console.print(f"{name}: loss jump at growth {curve.loss_jump:+.5f}; "
                      f"final val {curve.val_loss[-1]:.4f} at step {curve.steps[-1]}")
        curves.append(curve)
    return curves, target


def _params(cfg: ModelConfig) -> int:
    from sapwood.sizing import count_params

    return count_params(cfg).total


def _results(curves: list[RunCurve], target: float, settings: BenchSettings, small: ModelConfig,
             large: ModelConfig) -> list[Result]:
    scratch = curves[0].first_reaching(target)
    assert scratch is not None  # the target is the scratch run's own final loss or was reached by it
    results = []
    for curve in curves[1:]:
        reached = curve.first_reaching(target)
        params: dict[str, Any] = {"reached_target": reached is not None, "target_val_loss": target,
                                  "growth_step": curve.growth_step, "loss_jump_at_growth": curve.loss_jump,
                                  "steps_to_target": reached[2] if reached else None,
                                  "scratch_steps_to_target": scratch[2], "small": f"{small.layers}x{small.hidden}",
                                  "large": f"{large.layers}x{large.hidden}", "scale": settings.scale}
        flops = reached[0] if reached else curve.flops[-1]
        seconds = reached[1] if reached else curve.seconds[-1]
        results.append(Result(f"FLOPs to target: {curve.name}", flops, "FLOPs", scratch[0], params=params,
                              baseline="L from scratch"))
        results.append(Result(f"train seconds to target: {curve.name}", seconds, "s", scratch[1], params=params,
                              baseline="L from scratch"))
    return results


def _plot(ax: Any, curves: list[RunCurve], target: float) -> None:
    for curve in curves:
        ax.plot(curve.flops, curve.val_loss, label=curve.name, lw=1.3)
        if curve.growth_step is not None:
            index = next((i for i, s in enumerate(curve.steps) if s >= curve.growth_step), None)
            if index is not None:
                ax.plot(curve.flops[index], curve.val_loss[index], "k|", ms=12)
    ax.axhline(target, color="gray", ls="--", label=f"target {target:.3f}")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    lows = [min(c.val_loss) for c in curves if c.val_loss]
    if lows and math.isfinite(min(lows)):
        ax.set_ylim(min(lows) - 0.1, min(lows) + 2.5)
    ax.legend()
