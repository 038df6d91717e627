"""``sapwood bench grow``: training FLOPs (and wall time) to reach a target validation loss.

Model L (the larger shape) trained from scratch is the baseline. Against it, a small model S is trained
for ``grow_fraction`` of the steps and grown into L, then trained on, with

- ``zero``: function-preserving growth by zero-initialized new outputs (rescaled norms, identity blocks);
- ``random``: the same shapes, every new part randomly initialized (outputs jump);
- ``masked``: masked structural growth (``sapwood.grow.masked``), new parts random, masks ramp 0 -> 1;
- ``split``: FFN units split with noise (function-preserving), depth by copied blocks with zero outputs;
- ``gstack``: G_stack, S has a quarter of L's layers and the whole stack is repeated 4 times (Du et al.,
  2024), width then grown by masks.

Each seed runs scratch and every method; results give, per method, the FLOPs and seconds to the target
summed over seeds (ratio scratch / method), and per-seed ratios with their mean, spread and minimum.
The crossing of the target is interpolated linearly between evaluations.

All runs see the same token stream (text of the Python standard library, BPE-tokenized here), the same
optimizer (AdamW, the trainer's parameter groups) and LR (linear warm-up, then constant, so a run may go
on past the baseline's length). The target is the baseline's validation loss at its last step; a run's
cost is the training FLOPs (``sapwood.sizing.flops_per_token`` of the shape at each step, times tokens)
and seconds spent until its validation loss first reaches the target. Results are ratios baseline/run.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from sapwood.bench.harness import Result, print_results, write_suite
from sapwood.config import ModelConfig
from sapwood.data.text import TokenShards, WindowLoader, stdlib_corpus, tokenize_corpus
from sapwood.errors import SapwoodError
from sapwood.grow.masked import grow_model_masked
from sapwood.grow.operators import split_ffn, stack_depth
from sapwood.grow.optimizer import apply_changes_to_optimizer
from sapwood.grow.plan import GrowthRequest, grow_model, shape_of
from sapwood.model.transformer import Decoder
from sapwood.sizing import flops_per_token

console = Console()


def _grow_zero(model, large, optimizer, generator, settings):
    grow_model(model, _request(large, depth_init="identity"), optimizer, generator=generator)


def _grow_random(model, large, optimizer, generator, settings):
    grow_model(
        model, _request(large, depth_init="random", function_preserving=False), optimizer, generator=generator
    )


def _grow_masked(model, large, optimizer, generator, settings):
    masks, _ = grow_model_masked(model, _request(large), settings.mask_ramp_steps, optimizer, generator)
    return masks


def _grow_split(model, large, optimizer, generator, settings):
    """FFN units split with noise; heads and hidden function-preserving; depth by copied blocks with zero
    outputs (function-preserving stacking)."""
    changes = split_ffn(model, large.ffn, settings.split_noise, generator)
    apply_changes_to_optimizer(optimizer, changes, model)
    grow_model(model, _request(large, depth_init="stack"), optimizer, generator=generator)


def _grow_gstack(model, large, optimizer, generator, settings):
    """G_stack: the whole small stack repeated (g = large.layers / small.layers), then width by masks."""
    apply_changes_to_optimizer(optimizer, stack_depth(model, large.layers), model)
    masks, _ = grow_model_masked(model, _request(large), settings.mask_ramp_steps, optimizer, generator)
    return masks


def _request(large: ModelConfig, **how) -> GrowthRequest:
    return GrowthRequest(
        layers=large.layers, hidden=large.hidden, ffn=large.ffn, heads=large.heads, kv_heads=large.kv_heads,
        layer_position="evenly", **how,
    )


# name -> (grow function, depth factor of the small model: large.layers / small.layers)
METHODS: dict[str, tuple[Callable, int]] = {
    "zero": (_grow_zero, 2), "random": (_grow_random, 2), "masked": (_grow_masked, 2),
    "split": (_grow_split, 2), "gstack": (_grow_gstack, 4),
}


@dataclass
class TrainSettings:
    """The training both benches share: batch, sequence, AdamW peak LR with linear warm-up, evaluation,
    how much longer a grown run may train than the baseline, the growth ramp and re-warm-up, model scale."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    eval_every: int = 4
    eval_batches: int = 4
    max_steps_factor: float = 1.5  # grown runs may train this much longer than the baseline to reach it
    mask_ramp_steps: int = 20
    rewarm_steps: int = 0  # after growth the LR ramps from lr / rewarm_steps back to lr over this many steps
    scale: float = 1.0


@dataclass
class BenchSettings(TrainSettings):
    grow_fraction: float = 0.3
    seed: int = 0
    vocab_size: int = 512
    split_noise: float = 0.01


def shapes(settings: TrainSettings, vocab_size: int) -> tuple[ModelConfig, ModelConfig]:
    """(small S, large L): L has twice the layers, width, heads, kv heads and FFN of S (same head_dim)."""
    width = max(32, int(32 * settings.scale) // 16 * 16)
    head_dim = 16 if width < 128 else 32
    common = {
        "vocab_size": vocab_size, "head_dim": head_dim, "trained_context": settings.seq_len,
        "tied_embeddings": True,
    }
    small = ModelConfig(
        hidden=width, layers=2, heads=width // head_dim, kv_heads=max(1, width // (2 * head_dim)),
        ffn=3 * width, **common,
    )
    large = ModelConfig(
        hidden=2 * width, layers=4, heads=2 * small.heads, kv_heads=2 * small.kv_heads, ffn=6 * width,
        **common,
    )
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

    def first_reaching(self, target: float) -> tuple[float, float, float] | None:
        """(FLOPs, seconds, step) where the validation loss first reaches ``target``, linearly
        interpolated between the two evaluations around the crossing."""
        previous = None
        for point in zip(self.flops, self.seconds, self.steps, self.val_loss, strict=True):
            if point[3] <= target:
                if previous is None or previous[3] == point[3]:
                    return point[0], point[1], float(point[2])
                t = (previous[3] - target) / (previous[3] - point[3])
                return tuple(p + t * (q - p) for p, q in zip(previous[:3], point[:3], strict=True))
            previous = point
        return None


def _optimizer(model: Decoder, lr: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def _val_loss(model: Decoder, batches: list, device: torch.device) -> float:
    model.eval()
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(x.to(device)).float().flatten(0, 1), y.to(device).flatten()).item()
            for x, y in batches
        ]
    model.train()
    return sum(losses) / len(losses)


def lr_factor(step: int, warmup_steps: int, rewarm_steps: int = 0, grow_at: int | None = None) -> float:
    """The LR of optimizer step ``step + 1`` relative to the peak: linear warm-up, then constant; with
    ``rewarm_steps`` the k-th step after growth at ``grow_at`` runs at ``(k + 1) / rewarm_steps`` of it."""
    factor = min(1.0, (step + 1) / warmup_steps)
    if rewarm_steps and grow_at is not None and step >= grow_at:
        factor *= min(1.0, (step - grow_at + 1) / rewarm_steps)
    return factor


def train_curve(
    name: str, start: ModelConfig, final: ModelConfig, settings: BenchSettings, data: Path,
    device: torch.device, max_steps: int, grow_at: int | None = None, method: Callable | None = None,
    target: float | None = None,
) -> RunCurve:
    """Train from ``start`` (grown into ``final`` by ``method`` after step ``grow_at``) and record the
    validation curve; stops early once ``target`` is reached."""
    torch.manual_seed(settings.seed)
    model = Decoder(start).to(device)
    optimizer = _optimizer(model, settings.lr)
    grows_at = grow_at if method is not None else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.warmup_steps, settings.rewarm_steps, grows_at)
    )
    loader = WindowLoader(TokenShards(data, "train"), settings.seq_len, settings.batch_size, settings.seed)
    val_batches = WindowLoader(
        TokenShards(data, "val"), settings.seq_len, settings.batch_size, settings.seed
    ).fixed_batches(settings.eval_batches)
    tokens_per_step = settings.batch_size * settings.seq_len
    curve = RunCurve(name)
    flops, seconds, masks = 0.0, 0.0, None
    for step in range(1, max_steps + 1):
        started = time.perf_counter()
        inputs, targets = next(loader)
        loss = F.cross_entropy(model(inputs.to(device)).float().flatten(0, 1), targets.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if masks is not None and masks.active:
            masks.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        flops += flops_per_token(model.cfg, settings.seq_len) * tokens_per_step
        if step == grow_at and method is not None:
            before = _val_loss(model, val_batches, device)
            started = time.perf_counter()
            generator = torch.Generator(device=device).manual_seed(settings.seed + 1)
            masks = method(model, final, optimizer, generator, settings)
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


def run_grow_bench(
    out: Path, steps: int = 100, target_loss: float | None = None, scale: float = 1.0, seeds: int = 3,
    grow_fraction: float = 0.3, data_dir: Path | None = None, max_files: int = 120,
    methods: list[str] | None = None, seed: int = 0, rewarm_steps: int = 0,
    mask_ramp_steps: int | None = None, eval_every: int | None = None, budget_s: float | None = None,
) -> Path:
    """Scratch L and each growth method, for ``seeds`` seeds (``seed``, ``seed + 1``, ...).

    The suite is written after every seed, so a run stopped from outside keeps the seeds it finished;
    with ``budget_s`` no seed starts that the previous one's duration says would end past the budget.
    Evaluation runs every ``eval_every`` steps (default: steps / 50, so the crossing is resolved to 2%
    before interpolation)."""
    chosen = methods or list(METHODS)
    for spec in chosen:
        parse_variant(spec, BenchSettings())
    if seeds < 1:
        raise SapwoodError(f"seeds={seeds} must be >= 1")
    if rewarm_steps < 0 or (mask_ramp_steps is not None and mask_ramp_steps < 1):
        raise SapwoodError(
            f"rewarm_steps={rewarm_steps} must be >= 0 and mask_ramp_steps={mask_ramp_steps} >= 1"
        )
    if not 0 < grow_fraction < 1:
        raise SapwoodError(f"grow_fraction={grow_fraction} must be between 0 and 1 (exclusive)")
    if eval_every is not None and eval_every < 1:
        raise SapwoodError(f"eval_every={eval_every} must be >= 1")
    if budget_s is not None and budget_s <= 0:
        raise SapwoodError(f"budget_s={budget_s} must be > 0")
    settings = BenchSettings(
        steps=steps, scale=scale, seed=seed, grow_fraction=grow_fraction,
        mask_ramp_steps=mask_ramp_steps or max(1, steps // 10), rewarm_steps=rewarm_steps,
        eval_every=eval_every or max(1, steps // 50),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_tokens(Path(data_dir or tmp) / "tokens", settings.vocab_size, max_files)
        vocab = int(json.loads((data / "meta.json").read_text())["vocab_size"])
        small, large = shapes(settings, vocab)
        console.print(
            f"S: {small.layers}x{small.hidden} ({_params(small):,} params) -> "
            f"L: {large.layers}x{large.hidden} ({_params(large):,} params), {steps} steps, "
            f"{seeds} seeds, {device}"
        )
        torch.set_flush_denormal(True)  # tiny CPU models otherwise spend time in denormal arithmetic
        try:
            per_seed: list[tuple[list[RunCurve], float]] = []
            for index in range(seeds):
                seed_began = time.perf_counter()
                settings.seed = seed + index
                per_seed.append(
                    _run_methods(
                        settings, data, device, small, large, steps, target_loss, chosen, warm_up=index == 0
                    )
                )
                now = time.perf_counter()
                last = index == seeds - 1
                if not last and budget_s is not None and now - began + (now - seed_began) > budget_s:
                    console.print(
                        f"budget {budget_s:g} s: {index + 1} of {seeds} seeds run "
                        f"({now - began:.0f} s; one more would take ~{now - seed_began:.0f} s)"
                    )
                    last = True
                path = _write_grow_suite(
                    out, per_seed, settings, small, large, seed, budget_s, seeds, printed=last
                )
                if last:
                    break
        finally:
            torch.set_flush_denormal(False)  # process-global CPU state: leave it as we found it
    return path


def _write_grow_suite(
    out: Path, per_seed: list[tuple[list[RunCurve], float]], settings: BenchSettings, small: ModelConfig,
    large: ModelConfig, seed: int, budget_s: float | None, seeds: int, printed: bool,
) -> Path:
    results = _seed_results(per_seed, settings, small, large)
    if printed:
        print_results(results)
    extra = {
        "seeds": [
            {"seed": seed + i, "target_val_loss": t, "curves": [c.__dict__ for c in cs]}
            for i, (cs, t) in enumerate(per_seed)
        ],
        "small": small.model_dump(),
        "large": large.model_dump(),
        "steps": settings.steps,
        "scale": settings.scale,
        "eval_every": settings.eval_every,
        "seeds_requested": seeds,
        "seeds_run": len(per_seed),
        "budget_s": budget_s,
    }
    curves, target = per_seed[0]
    return write_suite("grow", results, out, plot=lambda ax: _plot(ax, curves, target), extra=extra)


def _small_for(small: ModelConfig, large: ModelConfig, depth_factor: int) -> ModelConfig:
    return small.model_copy(update={"layers": max(1, large.layers // depth_factor)})


def _run_methods(settings, data, device, small, large, steps, target_loss, methods, warm_up=False):
    """Scratch first (it sets the target), then each growth method towards that target."""
    if warm_up:  # untimed warm-up of kernels and allocator, so the first run pays nothing extra
        for shape in (small, large):
            train_curve("warm-up", shape, shape, settings, data, device, 8)
    scratch = train_curve("scratch", large, large, settings, data, device, steps)
    target = target_loss if target_loss is not None else scratch.val_loss[-1]
    console.print(f"seed {settings.seed} scratch: val loss {scratch.val_loss[-1]:.4f} after {steps} steps")
    max_steps = int(settings.max_steps_factor * steps)
    curves = [scratch]
    for name in methods:
        base, variant = parse_variant(name, settings)
        method, depth_factor = METHODS[base]
        start = _small_for(small, large, depth_factor)
        grow_at = max(1, int(variant.grow_fraction * steps))
        curve = train_curve(name, start, large, variant, data, device, max_steps, grow_at, method, target)
        reached = curve.first_reaching(target)
        console.print(
            f"seed {settings.seed} {name}: loss jump at growth {curve.loss_jump:+.5f}; "
            + (f"target at step {reached[2]:.1f}" if reached else "target not reached")
        )
        curves.append(curve)
    return curves, target


def _params(cfg: ModelConfig) -> int:
    from sapwood.sizing import count_params

    return count_params(cfg).total


def _results(
    curves: list[RunCurve], target: float, settings: BenchSettings, small: ModelConfig, large: ModelConfig
) -> list[Result]:
    """One seed: FLOPs and seconds to the target per method, against scratch L."""
    return _seed_results([(curves, target)], settings, small, large)


def _seed_results(
    per_seed: list[tuple[list[RunCurve], float]], settings: BenchSettings, small: ModelConfig,
    large: ModelConfig,
) -> list[Result]:
    """Per method: FLOPs and seconds to each seed's target summed over seeds against scratch's (so the
    ratio is a FLOPs-weighted mean), with each seed's ratio, their mean, spread (std) and minimum."""
    results = []
    names = [c.name for c in per_seed[0][0][1:]]
    for index, name in enumerate(names, start=1):
        values = {
            "flops": [], "seconds": [], "base_flops": [], "base_seconds": [], "reached": [], "steps": [],
        }
        for curves, target in per_seed:
            scratch = curves[0].first_reaching(target)
            assert scratch is not None  # the target is the scratch run's own final loss or was reached by it
            curve = curves[index]
            reached = curve.first_reaching(target)
            values["flops"].append(reached[0] if reached else curve.flops[-1])
            values["seconds"].append(reached[1] if reached else curve.seconds[-1])
            values["base_flops"].append(scratch[0])
            values["base_seconds"].append(scratch[1])
            values["reached"].append(reached is not None)
            values["steps"].append(reached[2] if reached else None)
        flops_ratios = [b / v for b, v in zip(values["base_flops"], values["flops"], strict=True)]
        second_ratios = [b / v for b, v in zip(values["base_seconds"], values["seconds"], strict=True)]
        curve0 = per_seed[0][0][index]
        params: dict[str, Any] = {
            "seeds": len(per_seed), "reached_target": values["reached"], "steps_to_target": values["steps"],
            "growth_step": curve0.growth_step,
            "loss_jump_at_growth": [c[index].loss_jump for c, _ in per_seed],
            "flops_ratio_per_seed": flops_ratios, "flops_ratio_mean": statistics.fmean(flops_ratios),
            "flops_ratio_std": statistics.stdev(flops_ratios) if len(flops_ratios) > 1 else 0.0,
            "flops_ratio_min": min(flops_ratios), "seconds_ratio_per_seed": second_ratios,
            "seconds_ratio_mean": statistics.fmean(second_ratios),
            "seconds_ratio_std": statistics.stdev(second_ratios) if len(second_ratios) > 1 else 0.0,
            "small": f"{_small_layers(name, large)}x{small.hidden}",
            "large": f"{large.layers}x{large.hidden}", "scale": settings.scale,
            **_variant_params(name, settings), "mask_ramp_steps": settings.mask_ramp_steps,
        }
        results.append(
            Result(
                f"FLOPs to target: {name}", sum(values["flops"]), "FLOPs", sum(values["base_flops"]),
                params=params, baseline="L from scratch",
            )
        )
        results.append(
            Result(
                f"train seconds to target: {name}", sum(values["seconds"]), "s", sum(values["base_seconds"]),
                params=params, baseline="L from scratch",
            )
        )
    return results


def _small_layers(name: str, large: ModelConfig) -> int:
    base = name.split("@")[0].split("+")[0]
    return max(1, large.layers // METHODS[base][1]) if base in METHODS else large.layers // 2


def _variant_params(name: str, settings: BenchSettings) -> dict[str, Any]:
    if name.split("@")[0].split("+")[0] not in METHODS:
        return {"grow_fraction": settings.grow_fraction, "rewarm_steps": settings.rewarm_steps}
    variant = parse_variant(name, settings)[1]
    return {"grow_fraction": variant.grow_fraction, "rewarm_steps": variant.rewarm_steps}


def parse_variant(spec: str, settings: BenchSettings) -> tuple[str, BenchSettings]:
    """``method[@grow_fraction][+rewarmN]`` (e.g. ``masked@0.5+rewarm20``) -> (method, settings for it)."""
    import dataclasses
    import re

    match = re.fullmatch(r"([a-z]+)(?:@([0-9.]+))?(?:\+rewarm([0-9]+))?", spec)
    if match is None or match[1] not in METHODS:
        raise SapwoodError(
            f"growth method {spec!r} is not one of {', '.join(METHODS)} "
            "(optionally with @FRACTION and +rewarmN, e.g. masked@0.5+rewarm20)"
        )
    fraction = float(match[2]) if match[2] else settings.grow_fraction
    if not 0 < fraction < 1:
        raise SapwoodError(f"{spec!r}: grow fraction {fraction} must be between 0 and 1 (exclusive)")
    rewarm = int(match[3]) if match[3] else settings.rewarm_steps
    return match[1], dataclasses.replace(settings, grow_fraction=fraction, rewarm_steps=rewarm)


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


# --- growth under a memory budget, with the real trainer ------------------------------------------------


@dataclass
class BudgetSettings(TrainSettings):
    """A run that starts at S and grows by one increment whenever the plateau trigger fires, until the next
    increment would exceed the memory budget (that of L); against the grown run's final shape trained from
    scratch for ``steps``. The growing run may train ``max_steps_factor`` times longer (it is cheaper per
    step)."""

    steps: int = 300
    eval_every: int = 5
    plateau_window: int = 15
    plateau_min_rel_improvement: float = 0.02
    cooldown_steps: int = 10
    method: str = "masked"


def _budget_config(
    settings: BudgetSettings, model: ModelConfig, data: Path, out: Path, seed: int,
    growth: dict[str, Any] | None, steps: int,
):
    from sapwood.config import Config, validate

    train = {
        "steps": steps, "batch_size": settings.batch_size, "micro_batch_size": settings.batch_size,
        "lr": settings.lr, "min_lr": settings.lr / 10, "warmup_steps": settings.warmup_steps,
        "eval_every": settings.eval_every, "eval_batches": settings.eval_batches,
        "save_every": 10 * settings.steps, "log_every": 1, "out_dir": str(out), "progress": False,
        "seed": seed, "device": "auto",
    }
    return validate(
        Config,
        {
            "model": model.model_dump(), "train": train,
            "data": {"path": str(data), "seq_len": settings.seq_len}, "growth": growth,
        },
    )


def budget_curve(name: str, metrics_file: Path, start: ModelConfig, seq_len: int) -> RunCurve:
    """FLOPs (shape at each step x its tokens, shapes from the growth events), wall seconds and validation
    loss at each evaluation of a trainer run's ``metrics.jsonl``."""
    from sapwood.train.metrics import read_events

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    shape, curve = start, RunCurve(name)
    flops, seconds, last_time = 0.0, 0.0, None
    start_record = next(r for r in records if r["event"] == "start")
    last_time = start_record["time"]
    grown: list[tuple[int, ModelConfig]] = []  # (step, shape after it): an event at step s is logged before
    for record in records:  # step s's train record, and the new shape trains from step s + 1
        if record["event"] == "train":
            while grown and grown[0][0] < record["step"]:
                shape = grown.pop(0)[1]
            flops += flops_per_token(shape, seq_len) * record["units"]
            seconds += record["time"] - last_time
            last_time = record["time"]
        elif record["event"] == "growth":
            grown.append(
                (record["step"], (grown[-1][1] if grown else shape).model_copy(update=record["shape_after"]))
            )
            if curve.growth_step is None:
                curve.growth_step = record["step"]
        elif record["event"] == "eval":
            curve.flops.append(flops)
            curve.seconds.append(seconds)
            curve.steps.append(record["step"])
            curve.val_loss.append(float(record["val_loss"]))
    assert read_events(metrics_file, "done"), f"{metrics_file}: the run did not finish"
    return curve


def run_budget_bench(
    out: Path, steps: int = 300, seeds: int = 3, seed: int = 0, data_dir: Path | None = None,
    max_files: int = 120, method: str = "masked", rewarm_steps: int = 0, scale: float = 1.0,
    plateau_window: int = 15, min_rel_improvement: float = 0.02,
) -> Path:
    """Growth under a memory budget end to end (``sapwood train`` with a ``growth:`` plateau trigger and
    ``caps.memory_budget_gb``) against scratch training of the grown run's final shape, per seed."""
    from sapwood.grow.plan import training_memory_gb
    from sapwood.train.callbacks import callbacks_from_config
    from sapwood.train.loop import Trainer

    if method not in ("zero", "masked"):
        raise SapwoodError(f"method={method!r} must be zero or masked")
    if seeds < 1:
        raise SapwoodError(f"seeds={seeds} must be >= 1")
    settings = BudgetSettings(
        steps=steps, method=method, rewarm_steps=rewarm_steps, scale=scale,
        mask_ramp_steps=max(1, steps // 15), plateau_window=plateau_window,
        plateau_min_rel_improvement=min_rel_improvement,
    )
    per_seed, events = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_tokens(Path(data_dir or tmp) / "tokens", 512, max_files)
        vocab = int(json.loads((data / "meta.json").read_text())["vocab_size"])
        small, large = shapes(settings, vocab)
        budget = training_memory_gb(large) * 1.001
        growth = {
            "plateau": {
                "window": settings.plateau_window,
                "min_rel_improvement": settings.plateau_min_rel_improvement,
            },
            "cooldown_steps": settings.cooldown_steps,
            "max_events": 16,
            "method": method,
            "mask_ramp_steps": settings.mask_ramp_steps,
            "rewarm_steps": rewarm_steps,
            "add": {
                "layers": 1, "hidden": small.hidden // 2, "ffn": small.ffn // 2, "heads": small.heads // 2,
            },
            "caps": {"memory_budget_gb": budget},
        }
        console.print(
            f"budget {budget * 1e9 / 2**20:.2f} MiB of training memory (that of L "
            f"{large.layers}x{large.hidden}); start S {small.layers}x{small.hidden}, {steps} steps"
        )
        for index in range(seeds):
            run_seed = seed + index
            grown_dir, scratch_dir = Path(tmp) / f"grown{run_seed}", Path(tmp) / f"scratch{run_seed}"
            config = _budget_config(
                settings, small, data, grown_dir, run_seed, growth, int(settings.max_steps_factor * steps)
            )
            Trainer(config, callbacks_from_config(config)).fit()
            grown = budget_curve(
                f"grow under budget ({method})", grown_dir / "metrics.jsonl", small, settings.seq_len
            )
            seed_events = [
                json.loads(line)
                for line in (grown_dir / "metrics.jsonl").read_text().splitlines()
                if '"growth' in line
            ]
            final_shape = next(
                (e["shape_after"] for e in reversed(seed_events) if e["event"] == "growth"), None
            )
            final = small.model_copy(update=final_shape or {})
            scratch_config = _budget_config(settings, final, data, scratch_dir, run_seed, None, steps)
            Trainer(scratch_config).fit()
            scratch = budget_curve("scratch", scratch_dir / "metrics.jsonl", final, settings.seq_len)
            target = scratch.val_loss[-1]
            reached = grown.first_reaching(target)
            at_steps = grown.steps.index(steps) if steps in grown.steps else -1
            console.print(
                f"seed {run_seed}: {sum(e['event'] == 'growth' for e in seed_events)} growth events "
                f"(steps {[e['step'] for e in seed_events if e['event'] == 'growth']}), final "
                f"{final.layers}x{final.hidden}; val loss at step {steps}: grown "
                f"{grown.val_loss[at_steps]:.4f}, scratch {target:.4f}; "
                + (f"target at step {reached[2]:.1f}" if reached else "target not reached")
            )
            per_seed.append(([scratch, grown], target))
            events.append(
                {
                    "seed": run_seed, "events": seed_events, "final_shape": shape_of(final),
                    "val_loss_at_scratch_steps": grown.val_loss[at_steps], "scratch_val_loss": target,
                    "target_reached_at_step": reached[2] if reached else None,
                    "grown_flops_total": grown.flops[-1], "scratch_flops_total": scratch.flops[-1],
                }
            )
    results = _seed_results(per_seed, BenchSettings(scale=scale, grow_fraction=0.0), small, final)
    for result in results:
        result.params.update(
            small=f"{small.layers}x{small.hidden}", large="final grown shape", budget_gb=budget,
            method=method, rewarm_steps=rewarm_steps, plateau_window=plateau_window,
            min_rel_improvement=min_rel_improvement,
        )
    print_results(results)
    extra = {
        "runs": events,
        "settings": settings.__dict__,
        "seeds": [{"target_val_loss": t, "curves": [c.__dict__ for c in cs]} for cs, t in per_seed],
    }
    curves, target = per_seed[0]
    return write_suite("grow-budget", results, out, plot=lambda ax: _plot(ax, curves, target), extra=extra)
