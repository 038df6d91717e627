"""Training memory per GPU, without allocation.

Conventions (bytes per parameter):

=============  =======  =====  ==============================================================
precision      weights  grads  notes
=============  =======  =====  ==============================================================
``fp32``       4        4      4-byte activations
``bf16``,      4        4      as ``sapwood.train`` runs it: the fp32 parameters are the master
``fp16``                       weights, gradients stay fp32, matmuls run in 16 bit (plus a 16-bit
                               compute copy, see :class:`MemoryPlan`); 2-byte activations
``bf16-pure``  2        2      16-bit weights and gradients, no fp32 master (memory-lean)
=============  =======  =====  ==============================================================

Optimizer state: ``adamw`` keeps ``exp_avg`` and ``exp_avg_sq`` in fp32 (8 bytes per element) plus a
4-byte ``step`` scalar per tensor (as ``torch.optim.AdamW`` does). ``adamw8bit`` / ``adamw4bit`` are
torchao's ``AdamW8bit`` / ``AdamW4bit`` as ``sapwood.train.optim`` runs them: each moment in 8 (4) bit
codes plus one fp32 scale per block of :data:`QUANT_BLOCK` (:data:`QUANT_BLOCK_4BIT`) elements and
its code book (256 or 16 fp32 values), for tensors of at least 4,096 elements that divide into
blocks; smaller tensors keep fp32 moments; plus the step scalar. ``sgd`` keeps nothing.

Sections: training state per rank (FSDP2 / TP / PP, exact); activations (Korthikanti et al. 2022);
the per-GPU plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from sapwood.config import ModelConfig, ParallelConfig
from sapwood.errors import ConfigError
from sapwood.sizing.count import ParamSpec, parameter_shapes

Precision = Literal["fp32", "bf16", "fp16", "bf16-pure"]
Optimizer = Literal["adamw", "adamw8bit", "adamw4bit", "sgd"]
Checkpointing = Literal["none", "selective", "full"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "bf16-pure")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "adamw4bit", "sgd")
QUANT_BLOCK = 256  # torchao AdamW8bit's block size
QUANT_BLOCK_4BIT = 128  # torchao AdamW4bit's
QUANT_MIN_NUMEL = 4096  # smaller tensors keep fp32 moments (as torchao and bitsandbytes)
GIB = 1024**3


# --- training state per rank ----------------------------------------------------------------------


@dataclass(frozen=True)
class StateBytes:
    """Bytes of each training state (``weights`` are the stored parameters)."""

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def weight_bytes_per_param(precision: str) -> int:
    _check_choice("precision", precision, PRECISIONS)
    return 2 if precision == "bf16-pure" else 4


def optimizer_bytes(numel: int, optimizer: str) -> int:
    """Optimizer state of one tensor of ``numel`` elements (see the module docstring)."""
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "sgd":
        return 0
    step = 4
    block, code_bits, book = (QUANT_BLOCK, 8, 256) if optimizer == "adamw8bit" else (QUANT_BLOCK_4BIT, 4, 16)
    if optimizer == "adamw" or numel < QUANT_MIN_NUMEL or numel % block:
        return 8 * numel + step
    per_moment = numel * code_bits // 8 + 4 * (numel // block) + 4 * book
    return 2 * per_moment + step


def shard_length(size: int, parts: int, index: int) -> int:
    """Length of chunk ``index`` when ``size`` is split into ``parts`` like ``torch.chunk``: chunks of
    ``ceil(size / parts)``, the last ones shorter or empty. FSDP2 and DTensor ``Shard`` split this way."""
    chunk = math.ceil(size / parts)
    return max(0, min(chunk, size - index * chunk))


def stage_layers(layers: int, pp: int, pp_rank: int, interleaved: bool = False) -> list[int]:
    """Layer indices on pipeline rank ``pp_rank`` (contiguous runs, earlier stages take the remainder;
    interleaved 1F1B gives a rank stages ``pp_rank`` and ``pp_rank + pp``), as ``sapwood.train.parallel``."""
    stages = pp * (2 if interleaved else 1)
    base, extra = divmod(layers, stages)
    bounds = [0]
    for stage in range(stages):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    mine = [pp_rank, pp_rank + pp] if interleaved else [pp_rank]
    return [i for stage in mine for i in range(bounds[stage], bounds[stage + 1])]


def rank_params(
    cfg: ModelConfig, parallel: ParallelConfig, pp_rank: int = 0, tp_rank: int = 0, dp_shard_rank: int = 0,
    specs: list[ParamSpec] | None = None,
) -> list[tuple[ParamSpec, int]]:
    """The parameters a rank holds and the local element count of each.

    A parameter lives on the pipeline rank(s) holding its layer (embedding on the first stage, final
    norm and head on the last). Tensor parallel splits ``tp_dim`` into ``tp`` chunks; FSDP2 then splits
    dim 0 of the tensor-parallel local tensor into ``dp_shard`` chunks of ``ceil(rows / dp_shard)``
    rows, so the last ranks may hold fewer rows or none. (FSDP2 pads its storage to
    ``ceil(rows / dp_shard) * dp_shard`` rows, but the local shard, the gradient and the optimizer
    state have the unpadded size counted here; see :func:`padded_param_numel` for the storage.)
    """
    interleaved = parallel.pp_schedule == "interleaved_1f1b" and parallel.pp > 1
    layers = set(stage_layers(cfg.layers, parallel.pp, pp_rank, interleaved))
    num_stages = parallel.pp * (2 if interleaved else 1)
    my_stages = [pp_rank, pp_rank + parallel.pp] if interleaved else [pp_rank]
    first, last = 0 in my_stages, num_stages - 1 in my_stages
    held = []
    for spec in specs if specs is not None else parameter_shapes(cfg):
        if spec.layer is not None and spec.layer not in layers:
            continue
        if spec.layer is None and not (first if spec.name == "tok_embeddings.weight" else last):
            continue
        shape = list(spec.shape)
        if spec.tp_dim is not None and parallel.tp > 1:
            shape[spec.tp_dim] = shard_length(shape[spec.tp_dim], parallel.tp, tp_rank)
        if parallel.fsdp_shard > 1:
            shape[0] = shard_length(shape[0], parallel.fsdp_shard, dp_shard_rank)
        held.append((spec, math.prod(shape)))
    return held


def padded_param_numel(cfg: ModelConfig, parallel: ParallelConfig, pp_rank: int = 0, tp_rank: int = 0) -> int:
    """Elements of FSDP2's padded sharded storage on a rank: ``ceil(rows / dp_shard) * rest`` per tensor."""
    total = 0
    for spec, _ in rank_params(cfg, parallel, pp_rank, tp_rank, 0):
        shape = list(spec.shape)
        if spec.tp_dim is not None and parallel.tp > 1:
            shape[spec.tp_dim] = shard_length(shape[spec.tp_dim], parallel.tp, tp_rank)
        shape[0] = math.ceil(shape[0] / parallel.fsdp_shard)
        total += math.prod(shape)
    return total


def rank_state_bytes(
    cfg: ModelConfig, parallel: ParallelConfig, precision: str = "fp32", optimizer: str = "adamw",
    pp_rank: int = 0, tp_rank: int = 0, dp_shard_rank: int = 0, specs: list[ParamSpec] | None = None,
) -> StateBytes:
    """Bytes of weights, gradients and optimizer state one rank holds: exact for FSDP2-sharded fp32
    AdamW (local shard numel x 4; moments 8 per element plus a 4-byte step per tensor)."""
    per_param = weight_bytes_per_param(precision)
    held = rank_params(cfg, parallel, pp_rank, tp_rank, dp_shard_rank, specs)
    numel = sum(n for _, n in held)
    return StateBytes(
        weights=numel * per_param,
        grads=numel * per_param,
        optimizer=sum(optimizer_bytes(n, optimizer) for _, n in held),
    )


def training_memory_bytes(cfg: ModelConfig, precision: str = "fp32", optimizer: str = "adamw") -> int:
    """Weights + gradients + optimizer state of the whole model on one device (no parallelism)."""
    return rank_state_bytes(cfg, ParallelConfig(), precision, optimizer).total


# --- activations (Korthikanti et al. 2022) --------------------------------------------------------


def activation_bytes_per_layer(
    cfg: ModelConfig, seq: int, micro_batch: int, tp: int = 1, checkpointing: str = "none",
    sequence_parallel: bool = True, bytes_per_activation: int = 2,
) -> float:
    """Activation memory of one transformer layer for one micro-batch, by the published formulas of
    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (Table 2),
    with s = seq, b = micro_batch, h = hidden, a = heads, t = tp:

    - no recomputation, no parallelism:          ``s b h (34 + 5 a s / h)``
    - tensor parallel, no sequence parallel:     ``s b h (10 + 24 / t + 5 a s / (h t))``
    - tensor + sequence parallel:                ``s b h / t (34 + 5 a s / h)``
    - selective recomputation (attention core):  ``s b h 34 / t`` (TP+SP), ``s b h (10 + 24 / t)`` (TP)
    - full recomputation (layer input only):     ``2 s b h / t`` (TP+SP), ``2 s b h`` otherwise

    The formulas count 16-bit activations (and 1-byte dropout masks) of a GPT block with 4h MLP; the
    ``5 a s / h`` term is the materialized attention matrix. Fused attention (SDPA flash /
    memory-efficient, which the Decoder uses) never stores it, so on GPU "selective" is what a run
    without checkpointing actually needs. ``bytes_per_activation=4`` (fp32) doubles every figure.
    """
    _check_choice("checkpointing", checkpointing, ("none", "selective", "full"))
    s, b, h, a, t = seq, micro_batch, cfg.hidden, cfg.heads, tp
    sp = sequence_parallel or t == 1
    if checkpointing == "full":
        value = 2 * s * b * h / (t if sp else 1)
    elif checkpointing == "selective":
        value = s * b * h * 34 / t if sp else s * b * h * (10 + 24 / t)
    elif sp:
        value = s * b * h / t * (34 + 5 * a * s / h)
    else:
        value = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    return value * bytes_per_activation / 2


def pipeline_in_flight(parallel: ParallelConfig, pp_rank: int = 0) -> int:
    """Micro-batches whose activations pipeline rank ``pp_rank`` holds at once: ``pp - pp_rank`` under
    1F1B (the first stage the most; bounded by the micro-batch count; interleaved counted the same),
    every micro-batch under GPipe, 1 without pipelining."""
    if parallel.pp == 1:
        return 1
    if parallel.pp_schedule == "gpipe":
        return parallel.pp_microbatches
    return min(parallel.pp - pp_rank, parallel.pp_microbatches)


# --- the plan for one config ------------------------------------------------------------------------


# Bytes per element of the [tokens x vocab] logits at the loss: the fp32 logits and their
# log-softmax (kept for backward), plus the 16-bit matmul output when the head runs in 16 bit.
LOGIT_BYTES = {"fp32": 8, "bf16": 10, "fp16": 10, "bf16-pure": 10}
# fp32 temporaries of one tensor's AdamW step run eagerly (the weight, gradient, both moments
# dequantized, their updates, the denominator): alive during backward when the step runs in it.
# A compiled step (CUDA) fuses them away, so this is the bound for the CPU / eager step.
STEP_TEMPORARY_COPIES = 10


@dataclass
class MemoryPlan:
    """Memory per GPU (worst rank: dp_shard rank 0, the pipeline stage with the most) in bytes.

    ``compute_copy``: 16-bit weights used by bf16/fp16 matmuls over fp32 parameters: the whole local
    model without FSDP (autocast keeps the casts for backward), two blocks' worth with FSDP (the
    gathered block and the prefetched one). ``activations``: per-layer figure x layers on the stage x
    micro-batches in flight, plus, with full checkpointing, one layer recomputed in backward.
    ``logits``: the loss's ``[tokens x vocab / tp]`` logits (:data:`LOGIT_BYTES` per element; one
    chunk of ``loss_chunk`` tokens when the loss is chunked) on the last stage. ``grads``: gradients
    alive at once: all of them, or with ``optimizer_in_backward`` only the largest tensor's.
    ``step_temporaries``: with ``optimizer_in_backward``, the eager step's fp32 temporaries of the
    largest tensor (:data:`STEP_TEMPORARY_COPIES`), alive inside backward.

    The peak is the larger of two moments of the step: the loss (weights, optimizer state, stored
    activations and the logits; the gradients of the previous step are freed) and the end of backward
    (every live gradient, step temporaries and the stored activations): :attr:`total`.
    """

    precision: str
    optimizer: str
    checkpointing: str
    seq: int
    micro_batch: int
    weights: int
    grads: int
    optimizer_state: int
    compute_copy: int
    activations: int
    worst_pp_rank: int
    activation_per_layer: dict[str, float] = field(default_factory=dict)
    logits: int = 0
    optimizer_in_backward: bool = False
    loss_chunk: int | None = None
    step_temporaries: int = 0

    @property
    def total(self) -> int:
        resident = self.weights + self.optimizer_state + self.compute_copy + self.activations
        return resident + max(self.logits, self.grads + self.step_temporaries)


def memory_plan(
    cfg: ModelConfig, parallel: ParallelConfig, precision: str = "bf16", optimizer: str = "adamw",
    checkpointing: str = "full", seq: int | None = None, micro_batch: int = 1,
    optimizer_in_backward: bool = False, loss_chunk: int | None = None,
) -> MemoryPlan:
    """Per-GPU training memory of ``cfg`` under ``parallel`` (sequence parallel on whenever tp > 1).

    Context parallelism (``parallel.cp``) divides the layers' activations by ``cp`` (each rank holds
    ``seq / cp`` positions; the ring's key/value blocks in flight are two blocks of one layer) and shards
    the weights over ``dp_shard x cp``; the loss still sees the gathered ``[seq x vocab]`` logits."""
    seq = seq or cfg.trained_context
    act_bytes = 4 if precision == "fp32" else 2
    local_seq = math.ceil(seq / parallel.cp)
    per_layer = {
        mode: activation_bytes_per_layer(cfg, local_seq, micro_batch, parallel.tp, mode, True, act_bytes)
        for mode in ("none", "selective", "full")
    }
    # SDPA never materializes the attention matrix, so "none" costs the selective figure in practice.
    stored = per_layer["full"] if checkpointing == "full" else per_layer["selective"]
    interleaved = parallel.pp_schedule == "interleaved_1f1b" and parallel.pp > 1
    specs = parameter_shapes(cfg)
    best: MemoryPlan | None = None
    for pp_rank in range(parallel.pp):
        state = rank_state_bytes(cfg, parallel, precision, optimizer, pp_rank=pp_rank, specs=specs)
        held = rank_params(cfg, parallel, pp_rank=pp_rank, specs=specs)
        layers_here = stage_layers(cfg.layers, parallel.pp, pp_rank, interleaved)
        compute_copy = 0
        if precision in ("bf16", "fp16"):
            if parallel.fsdp_shard > 1:
                block = sum(n for spec, n in held if spec.layer == (layers_here[0] if layers_here else -1))
                compute_copy = 2 * 2 * block * parallel.fsdp_shard
            else:
                compute_copy = 2 * sum(n for _, n in held)
        activations = stored * len(layers_here) * pipeline_in_flight(parallel, pp_rank)
        if checkpointing == "full":
            activations += per_layer["selective"]
        logits = 0
        if pp_rank == parallel.pp - 1:
            tokens = seq * micro_batch if loss_chunk is None else min(loss_chunk, seq * micro_batch)
            logits = tokens * cfg.vocab_size / parallel.tp * LOGIT_BYTES[precision]
        grads, step_temporaries = state.grads, 0
        if optimizer_in_backward and held:
            largest = max(n for _, n in held)
            grads = largest * weight_bytes_per_param(precision)
            eager_step = (
                optimizer != "adamw" or precision == "bf16-pure"
            )  # torchao's step, not torch's fused one
            step_temporaries = STEP_TEMPORARY_COPIES * 4 * largest if eager_step else 0
        plan = MemoryPlan(
            precision, optimizer, checkpointing, seq, micro_batch, state.weights, grads, state.optimizer,
            int(compute_copy), int(activations), pp_rank, per_layer, int(logits), optimizer_in_backward,
            loss_chunk, step_temporaries,
        )
        if best is None or plan.total > best.total:
            best = plan
    assert best is not None
    return best


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")
