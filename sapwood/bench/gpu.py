"""``sapwood bench gpu``: the prepared device check, one command on one GPU in at most 8 minutes.

Sections, each written to ``OUT/gpu.json`` as soon as it finishes (a run stopped by its time limit
keeps what it measured):

``attention``
    The SDPA kernel training attention dispatches to (flash, memory_efficient, cudnn or math) for
    each model below at its sequence length and dtype.
``astro-13b``
    Training steps of the 13.14B preset under the memory plan (bf16-pure weights, torchao 8-bit
    AdamW stepped inside backward, chunked cross-entropy, activation checkpointing on every block,
    ``torch.compile`` per block): peak allocated and reserved memory, fragmentation, forward and
    backward seconds per batch, tokens/s and MFU, next to the analytic plan
    (:func:`sapwood.sizing.memory_plan`) and the targets (< 85 GB, forward < 2 s, backward < 3 s,
    fragmentation < 10%).
``mfu``
    Tokens/s and MFU of research-799m and of a Llama-3-8B-shaped model, same path; the anchor is
    torchtitan's Llama 3.1 8B on H100 (5,762 tokens/s per GPU with FSDP, 6,667 with compile).

The training step is the one ``sapwood train`` runs:
:func:`sapwood.train.parallel.apply_training_parallelism`,
``materialize``, :func:`sapwood.train.optim.build_optimizer`, the text task's loss (chunked when
``loss_chunk`` is set), with forward and backward timed apart. ``smoke=True`` runs every section on
tiny shapes on the CPU (no compile): the same code path, what CI and ``--smoke`` exercise.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sapwood.bench.harness import Result, device_description, synchronize, write_suite
from sapwood.config import Config, ModelConfig, TrainConfig, load_config
from sapwood.errors import SapwoodError

# torchtitan's published Llama 3.1 8B throughput per H100 (FSDP, bf16; and with torch.compile).
TORCHTITAN_8B_TOKENS_PER_S = {"fsdp": 5762.0, "fsdp+compile": 6667.0}
LLAMA3_8B = {"vocab_size": 128256, "hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "ffn": 14336,
             "rope_theta": 500000.0, "trained_context": 8192, "tied_embeddings": False}
TARGETS = {"peak_gb": 85.0, "forward_s": 2.0, "backward_s": 3.0, "fragmentation": 0.10, "mfu": 0.50}
SMOKE_SHAPE = {"vocab_size": 256, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "ffn": 128,
               "trained_context": 64, "tied_embeddings": False}


@dataclass(frozen=True)
class StepPlan:
    """One model and the memory-lean options it trains with in the check."""

    name: str
    model: ModelConfig
    seq: int
    micro_batch: int
    precision: str = "bf16-pure"
    optimizer: str = "adamw8bit"
    optimizer_in_backward: bool = True
    loss_chunk: int | None = 1024
    activation_checkpointing: str = "every_layer"
    compile: bool = True
    steps: int = 3

    def train_config(self, device: str) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.micro_batch, micro_batch_size=self.micro_batch,
                           precision=self.precision, optimizer=self.optimizer,
                           optimizer_in_backward=self.optimizer_in_backward,
                           grad_clip=None if self.optimizer_in_backward else 1.0, loss_chunk=self.loss_chunk,
                           activation_checkpointing=self.activation_checkpointing, compile=self.compile,
                           device=device, progress=False)


@dataclass
class StepFigures:
    """What one model's timed training steps measured."""

    name: str
    params: int
    seq: int
    micro_batch: int
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    first_step_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    planned_gb: float = 0.0
    attention_kernel: str = ""
    tokens_per_s: float = 0.0
    mfu: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


def bench_plans(smoke: bool) -> list[StepPlan]:
    """astro-13b under its memory plan, research-799m and a Llama-3-8B shape (tiny shapes when ``smoke``)."""
    astro = load_config("astro-13b").model
    research = load_config("research-799m").model
    llama = ModelConfig(**LLAMA3_8B)
    if smoke:
        tiny = ModelConfig(**SMOKE_SHAPE)
        return [StepPlan("astro-13b", tiny, 64, 1, loss_chunk=32, compile=False, steps=2),
                StepPlan("research-799m", tiny, 64, 2, precision="bf16", optimizer="adamw",
                         optimizer_in_backward=False, loss_chunk=None, activation_checkpointing="none",
                         compile=False, steps=2),
                StepPlan("llama3-8b-shape", tiny, 64, 1, loss_chunk=32, activation_checkpointing="every_k",
                         compile=False, steps=2)]
    return [
        # The astro plan: 60.9 GB predicted (sapwood size astro-13b --precision bf16-pure ...).
        StepPlan("astro-13b", astro, 4096, 1),
        # 799M: fp32 master weights + bf16 autocast + fused AdamW (12.8 GB of state), no recompute.
        StepPlan("research-799m", research, 2048, 8, precision="bf16", optimizer="adamw",
                 optimizer_in_backward=False, loss_chunk=None, activation_checkpointing="none"),
        # 8B on one GPU: bf16 weights, 8-bit states stepped in backward, every other block recomputed.
        StepPlan("llama3-8b-shape", llama, 8192, 1, activation_checkpointing="every_k"),
    ]


def planned_peak_gb(plan: StepPlan) -> float:
    from sapwood.config import ParallelConfig
    from sapwood.sizing import memory_plan

    checkpointing = {"every_layer": "full", "none": "none", "every_k": "selective"}[
        plan.activation_checkpointing
    ]
    mp = memory_plan(plan.model, ParallelConfig(), plan.precision, plan.optimizer, checkpointing, plan.seq,
                     plan.micro_batch, plan.optimizer_in_backward, plan.loss_chunk)
    return mp.total / 1e9


def run_steps(plan: StepPlan, device: torch.device) -> StepFigures:
    """Build ``plan``'s model as ``sapwood train`` does and time its training steps (the first, which
    compiles, apart)."""
    from sapwood.model.folder import materialize
    from sapwood.model.transformer import Decoder, attention_kernel
    from sapwood.sizing import count_params
    from sapwood.train.chunked_loss import lm_loss_chunked
    from sapwood.train.device_stats import MfuMeter, cuda_memory_report
    from sapwood.train.optim import OptimizerInBackward, build_optimizer
    from sapwood.train.parallel import apply_training_parallelism
    from sapwood.train.precision import DTYPES, Precision, cast_parameters

    train = plan.train_config(device.type)
    config = Config(model=plan.model, train=train)
    precision = Precision(plan.precision, device.type)
    compute_dtype = torch.float32 if plan.precision == "fp32" else DTYPES[plan.precision]
    figures = StepFigures(plan.name, count_params(plan.model).total, plan.seq, plan.micro_batch,
                          planned_gb=planned_peak_gb(plan),
                          attention_kernel=attention_kernel(plan.model, plan.seq, compute_dtype, device),
                          options={k: v for k, v in asdict(plan).items() if k != "model"})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Decoder(plan.model)
    parallel = apply_training_parallelism(model, config, device,
                                          lambda logits, targets: torch.nn.functional.cross_entropy(
                                              logits.float().flatten(0, 1), targets.flatten()))
    model = parallel.model
    materialize(model, device)
    if plan.precision == "bf16-pure":
        cast_parameters(model, DTYPES["bf16-pure"])
    optimizer = build_optimizer(model, train, device)
    in_backward = isinstance(optimizer, OptimizerInBackward)
    model.train()
    if device.type == "cuda":  # the steps' peak, not the fp32 initialization's before the bf16 cast
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator(device="cpu").manual_seed(0)

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if plan.loss_chunk is not None:
            return lm_loss_chunked(model, inputs, targets, plan.loss_chunk)
        logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    for step in range(plan.steps + 1):
        tokens = torch.randint(
            0, plan.model.vocab_size, (plan.micro_batch, plan.seq + 1), generator=generator
        )
        tokens = tokens.to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        synchronize(device.type)
        start = time.perf_counter()
        with precision.autocast():
            loss = loss_of(inputs, targets)
        synchronize(device.type)
        forward_end = time.perf_counter()
        with optimizer.stepping(True) if in_backward else contextlib.nullcontext():
            loss.backward()
        synchronize(device.type)
        backward_end = time.perf_counter()
        if not in_backward:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device.type)
        end = time.perf_counter()
        figures.losses.append(float(loss.detach()))
        del loss
        if step == 0:
            figures.first_step_s = end - start
            continue
        figures.forward_s.append(forward_end - start)
        figures.backward_s.append(backward_end - forward_end)
        figures.step_s.append(end - start)
    step_s = statistics.median(figures.step_s)
    figures.tokens_per_s = plan.micro_batch * plan.seq / step_s
    if device.type == "cuda":
        figures.memory = cuda_memory_report(device)
        figures.mfu = MfuMeter(plan.model, plan.seq, torch.cuda.get_device_name(device), plan.precision)(
            figures.tokens_per_s)
    return figures


def release_memory() -> None:
    """Free the last model before the next one: compiled graphs, reference cycles, cached blocks."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def figure_results(f: StepFigures) -> list[Result]:
    """Bench rows of one model: against the targets, the memory plan and torchtitan's anchor."""
    params = {
        "params": f.params, "seq": f.seq, "micro_batch": f.micro_batch,
        "attention_kernel": f.attention_kernel, "first_step_s": round(f.first_step_s, 2), **f.options,
    }
    rows = [
        Result(
            f"{f.name} forward", statistics.median(f.forward_s), "s/batch", TARGETS["forward_s"],
            params=params | {"samples": f.forward_s}, baseline="target",
        ),
        Result(
            f"{f.name} backward (incl. fused optimizer step)", statistics.median(f.backward_s), "s/batch",
            TARGETS["backward_s"], params=params | {"samples": f.backward_s}, baseline="target",
        ),
        Result(
            f"{f.name} tokens/s", f.tokens_per_s, "tokens/s",
            TORCHTITAN_8B_TOKENS_PER_S["fsdp+compile"] if "8b" in f.name else f.tokens_per_s, params=params,
            baseline="torchtitan Llama 3.1 8B per H100 (compile)" if "8b" in f.name else "self",
        ),
    ]
    if f.mfu is not None:
        rows.append(
            Result(f"{f.name} MFU", f.mfu, "fraction", TARGETS["mfu"], params=params, baseline="target")
        )
    if f.memory:
        peak = f.memory["memory_peak_allocated_gb"]
        rows += [
            Result(
                f"{f.name} peak memory vs target", peak, "GB", TARGETS["peak_gb"], params=params | f.memory,
                baseline="target (85 GB)",
            ),
            Result(
                f"{f.name} peak memory vs plan", peak, "GB", f.planned_gb, params=params,
                baseline="sapwood.sizing.memory_plan",
            ),
            Result(
                f"{f.name} fragmentation at peak", 100 * f.memory["memory_fragmentation_at_peak"], "%",
                100 * TARGETS["fragmentation"], params=params, baseline="target",
            ),
        ]
    return rows


def run_gpu_bench(out: Path, smoke: bool = False, models: list[str] | None = None,
                  budget_s: float = 420.0) -> tuple[list[Result], Path]:
    """Run the sections on this machine's GPU (``smoke``: tiny shapes on the CPU); write ``OUT/gpu.json``
    after each model. Models are skipped, and say so, once ``budget_s`` seconds have passed."""
    if not smoke and not torch.cuda.is_available():
        raise SapwoodError(
            "sapwood bench gpu needs a CUDA GPU; use --smoke for the CPU run of the same code path"
        )
    device = torch.device("cuda" if not smoke else "cpu")
    started = time.perf_counter()
    results: list[Result] = []
    extra: dict[str, Any] = {"torch": torch.__version__, "smoke": smoke, "models": {}, "skipped": []}
    path = write_suite("gpu", results, out, extra=extra)
    for plan in bench_plans(smoke):
        if models and plan.name not in models:
            continue
        if time.perf_counter() - started > budget_s:
            extra["skipped"].append(plan.name)
            continue
        try:
            figures = run_steps(plan, device)
        except torch.OutOfMemoryError as exc:  # recorded, and the next model still runs
            figures, error = None, f"out of memory: {str(exc).splitlines()[0]}"
        release_memory()  # outside the except block: its traceback holds the failed model's frames
        if figures is None:
            extra["models"][plan.name] = {"error": error}
            continue
        extra["models"][plan.name] = asdict(figures)
        results += figure_results(figures)
        path = write_suite("gpu", results, out, extra=extra)
    extra["seconds"] = round(time.perf_counter() - started, 1)
    extra["device"] = device_description()
    path = write_suite("gpu", results, out, extra=extra)
    return results, path


def read_gpu_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
