"""Sizing without allocation: exact parameter counts, training memory per GPU, FLOPs per token, MFU.

Everything here is arithmetic on the config (no tensors), so a 400B preset is sized in microseconds.
:func:`parameter_shapes` lists every parameter of :class:`sapwood.model.transformer.Decoder` with its
shape; the tests check it against the model built on the meta device, name by name.

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
4-byte ``step`` scalar per tensor (as ``torch.optim.AdamW`` does); ``adamw8bit`` keeps both moments in
int8 (2 bytes per element) plus one fp32 absmax per block of :data:`QUANT_BLOCK` elements per moment
(blockwise quantization as in bitsandbytes), plus the step scalar; ``sgd`` keeps nothing.

Sections: parameters; training state per rank (FSDP2 / TP / PP, exact); activations (Korthikanti et
al. 2022); FLOPs and MFU; the per-GPU plan and ``sapwood size`` report; the config solver
(``sapwood solve``); the ``create`` memory check, tables and the demo stage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sapwood.config import FAMILY_OPTIONS, Config, ModelConfig, ParallelConfig
from sapwood.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16", "bf16-pure"]
Optimizer = Literal["adamw", "adamw8bit", "sgd"]
Checkpointing = Literal["none", "selective", "full"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "bf16-pure")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "sgd")
QUANT_BLOCK = 2048
GIB = 1024**3

# Peak dense matmul throughput (FLOP/s) used for MFU: vendor datasheet numbers, no sparsity.
PEAK_FLOPS = {
    ("h100", "bf16"): 989e12, ("h100", "fp16"): 989e12, ("h100", "fp32"): 67e12,
    ("h200", "bf16"): 989e12, ("h200", "fp16"): 989e12, ("h200", "fp32"): 67e12,
    ("a100", "bf16"): 312e12, ("a100", "fp16"): 312e12, ("a100", "fp32"): 19.5e12,
}


# --- parameters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, the dim tensor parallel shards (None = replicated) and where it lives
    (``layer`` index, or None for the embedding / final norm / head)."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    layer: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parameter_shapes(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter of the Decoder, in ``named_parameters()`` order (a tied head is not listed).

    Tensor-parallel dims follow ``sapwood.train.parallel``: q/k/v/gate/up column-wise (dim 0), o/down
    row-wise (dim 1), embedding and head vocab-parallel (dim 0), norms replicated.
    """
    h, q_dim, kv_dim = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim

    def linear(name: str, out_dim: int, in_dim: int, tp_dim: int, bias: bool, layer: int) -> list[ParamSpec]:
        """Weight, then bias (sharded with the output rows when column-parallel, else replicated)."""
        weight = ParamSpec(name + ".weight", (out_dim, in_dim), tp_dim, layer)
        return [weight, ParamSpec(name + ".bias", (out_dim,), 0 if tp_dim == 0 else None, layer)] if bias else [weight]

    specs = [ParamSpec("tok_embeddings.weight", (cfg.vocab_size, h), 0, None)]
    for i in range(cfg.layers):
        p = f"layers.{i}."
        specs += [
            ParamSpec(p + "attention_norm.weight", (h,), None, i),
            *linear(p + "attention.wq", q_dim, h, 0, cfg.qkv_bias, i),
            *linear(p + "attention.wk", kv_dim, h, 0, cfg.qkv_bias, i),
            *linear(p + "attention.wv", kv_dim, h, 0, cfg.qkv_bias, i),
            *linear(p + "attention.wo", h, q_dim, 1, cfg.attention_out_bias, i),
        ]
        if cfg.qk_norm:
            specs += [ParamSpec(p + "attention.q_norm.weight", (cfg.head_dim,), None, i),
                      ParamSpec(p + "attention.k_norm.weight", (cfg.head_dim,), None, i)]
        specs += [
            ParamSpec(p + "ffn_norm.weight", (h,), None, i),
            *linear(p + "feed_forward.w1", cfg.ffn, h, 0, cfg.mlp_bias, i),
            *linear(p + "feed_forward.w3", cfg.ffn, h, 0, cfg.mlp_bias, i),
            *linear(p + "feed_forward.w2", h, cfg.ffn, 1, cfg.mlp_bias, i),
        ]
    specs.append(ParamSpec("norm.weight", (h,), None, None))
    if not cfg.tied_embeddings:
        specs.append(ParamSpec("output.weight", (cfg.vocab_size, h), 0, None))
    return specs


@dataclass(frozen=True)
class ParamCounts:
    """``embedding`` = token embedding + untied output head (tied: counted once);
    ``non_embedding`` = everything else (blocks and final norm)."""

    total: int
    embedding: int
    non_embedding: int
    per_layer: int


def layer_params(cfg: ModelConfig) -> int:
    """One block: 2h (norms) + h*(q + 2 kv + q) (attention) + 3 h ffn (SwiGLU), plus the family options:
    q + 2 kv (q/k/v biases), h (output bias), 2 head_dim (q/k norms), 2 ffn + h (FFN biases)."""
    q_dim, kv_dim = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    options = ((q_dim + 2 * kv_dim) * cfg.qkv_bias + cfg.hidden * cfg.attention_out_bias
               + 2 * cfg.head_dim * cfg.qk_norm + (2 * cfg.ffn + cfg.hidden) * cfg.mlp_bias)
    return 2 * cfg.hidden + cfg.hidden * (2 * q_dim + 2 * kv_dim) + 3 * cfg.hidden * cfg.ffn + options


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact counts by formula: V h (embedding) + L * layer + h (final norm) + V h (untied head)."""
    embedding = cfg.vocab_size * cfg.hidden * (1 if cfg.tied_embeddings else 2)
    per_layer = layer_params(cfg)
    non_embedding = cfg.layers * per_layer + cfg.hidden
    return ParamCounts(embedding + non_embedding, embedding, non_embedding, per_layer)


def config_param_specs(config: Config) -> list[ParamSpec]:
    """Parameter specs of any root config: by formula for the Decoder; other models (e.g. a cube
    surrogate) are built on the meta device and read off (no tensor parallel dims)."""
    if getattr(config, "cube", None) is None:
        return parameter_shapes(config.model)
    import torch

    from sapwood.model.folder import build_model

    with torch.device("meta"):
        model = build_model(config, "meta")
    specs = []
    for name, param in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        specs.append(ParamSpec(name, tuple(param.shape), None, layer))
    return specs


def config_param_counts(config: Config) -> ParamCounts:
    """Counts for any root config; for models other than the Decoder, ``embedding`` is everything
    outside the blocks and the final norm."""
    if getattr(config, "cube", None) is None:
        return count_params(config.model)
    specs = config_param_specs(config)
    total = sum(s.numel for s in specs)
    blocks = sum(s.numel for s in specs if s.layer is not None)
    final_norm = sum(s.numel for s in specs if s.name.startswith("norm."))
    return ParamCounts(total, total - blocks - final_norm, blocks + final_norm, blocks // max(config.model.layers, 1))


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
    if optimizer == "adamw":
        return 8 * numel + step
    return 2 * numel + 2 * 4 * math.ceil(numel / QUANT_BLOCK) + step


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
        if parallel.dp_shard > 1:
            shape[0] = shard_length(shape[0], parallel.dp_shard, dp_shard_rank)
        held.append((spec, math.prod(shape)))
    return held


def padded_param_numel(cfg: ModelConfig, parallel: ParallelConfig, pp_rank: int = 0, tp_rank: int = 0) -> int:
    """Elements of FSDP2's padded sharded storage on a rank: ``ceil(rows / dp_shard) * rest`` per tensor."""
    total = 0
    for spec, _ in rank_params(cfg, parallel, pp_rank, tp_rank, 0):
        shape = list(spec.shape)
        if spec.tp_dim is not None and parallel.tp > 1:
            shape[spec.tp_dim] = shard_length(shape[spec.tp_dim], parallel.tp, tp_rank)
        shape[0] = math.ceil(shape[0] / parallel.dp_shard)
        total += math.prod(shape)
    return total


def rank_state_bytes(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    precision: str = "fp32",
    optimizer: str = "adamw",
    pp_rank: int = 0,
    tp_rank: int = 0,
    dp_shard_rank: int = 0,
    specs: list[ParamSpec] | None = None,
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


# --- FLOPs ------------------------------------------------------------------------------------------


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L (heads * head_dim) s`` (Kaplan et al. 2020; PaLM App. B).

    ``N`` counts the parameters that take part in matmuls: everything but the input embedding lookup
    (the head counts even when tied). The attention term is forward+backward of QK^T and AV over the
    full ``s x s`` matrix (causal masking could halve it; MFU conventionally does not).
    """
    counts = count_params(cfg)
    matmul_params = counts.non_embedding + cfg.vocab_size * cfg.hidden
    return 6 * matmul_params + 12 * cfg.layers * cfg.heads * cfg.head_dim * seq


def mfu(tokens_per_second: float, flops_per_token_value: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware peak (0..1)."""
    return tokens_per_second * flops_per_token_value / peak_flops_per_second


def peak_flops(device_name: str, precision: str = "bf16") -> float | None:
    """Datasheet peak dense FLOP/s for a device name such as ``"NVIDIA H100 80GB HBM3"`` (None if unknown)."""
    dtype = "fp32" if precision == "fp32" else ("fp16" if precision == "fp16" else "bf16")
    lowered = device_name.lower()
    for (chip, kind), value in PEAK_FLOPS.items():
        if chip in lowered and kind == dtype:
            return value
    return None


# --- the plan for one config ------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Memory per GPU (worst rank: dp_shard rank 0, the pipeline stage with the most) in bytes.

    ``compute_copy``: 16-bit weights used by bf16/fp16 matmuls over fp32 parameters: the whole local
    model without FSDP (autocast keeps the casts for backward), two blocks' worth with FSDP (the
    gathered block and the prefetched one). ``activations``: per-layer figure x layers on the stage x
    micro-batches in flight, plus, with full checkpointing, one layer recomputed in backward, plus
    fp32 logits on the last stage (``s b V / t x 4``).
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

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer_state + self.compute_copy + self.activations


def memory_plan(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    precision: str = "bf16",
    optimizer: str = "adamw",
    checkpointing: str = "full",
    seq: int | None = None,
    micro_batch: int = 1,
) -> MemoryPlan:
    """Per-GPU training memory of ``cfg`` under ``parallel`` (sequence parallel on whenever tp > 1)."""
    seq = seq or cfg.trained_context
    act_bytes = 4 if precision == "fp32" else 2
    per_layer = {mode: activation_bytes_per_layer(cfg, seq, micro_batch, parallel.tp, mode, True, act_bytes)
                 for mode in ("none", "selective", "full")}
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
            if parallel.dp_shard > 1:
                block = sum(n for spec, n in held if spec.layer == (layers_here[0] if layers_here else -1))
                compute_copy = 2 * 2 * block * parallel.dp_shard
            else:
                compute_copy = 2 * sum(n for _, n in held)
        activations = stored * len(layers_here) * pipeline_in_flight(parallel, pp_rank)
        if checkpointing == "full":
            activations += per_layer["selective"]
        if pp_rank == parallel.pp - 1:
            activations += seq * micro_batch * cfg.vocab_size / parallel.tp * 4
        plan = MemoryPlan(precision, optimizer, checkpointing, seq, micro_batch, state.weights, state.grads,
                          state.optimizer, int(compute_copy), int(activations), pp_rank, per_layer)
        if best is None or plan.total > best.total:
            best = plan
    assert best is not None
    return best


def size_report(
    config: Config, precision: str | None = None, optimizer: str = "adamw", checkpointing: str | None = None,
    seq: int | None = None, micro_batch: int | None = None,
) -> dict[str, Any]:
    """Everything ``sapwood size`` prints, as one JSON-ready mapping."""
    train = getattr(config, "train", None)
    precision = precision or (train.precision if train is not None else "bf16")
    if checkpointing is None:  # the training section's choice; full recomputation when there is none
        checkpointing = "none" if train is not None and train.activation_checkpointing == "none" else "full"
    checkpointing = YAML_CHECKPOINTING.get(checkpointing, checkpointing)
    micro_batch = micro_batch or (train.micro_batch_size if train is not None else 1)
    cfg, parallel = config.model, config.parallel
    counts = config_param_counts(config)
    specs = config_param_specs(config)
    report: dict[str, Any] = {
        "name": config.name,
        "params_total": counts.total,
        "params_embedding": counts.embedding,
        "params_non_embedding": counts.non_embedding,
        "params_per_layer": counts.per_layer,
        "shape": {"layers": cfg.layers, "hidden": cfg.hidden, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
                  "head_dim": cfg.head_dim, "ffn": cfg.ffn, "vocab_size": cfg.vocab_size,
                  "tied_embeddings": cfg.tied_embeddings, "max_context": cfg.max_context},
        "parallel": {"dp_replicate": parallel.dp_replicate, "dp_shard": parallel.dp_shard, "tp": parallel.tp,
                     "pp": parallel.pp, "world_size": parallel.world_size},
        "training_state_bytes_single_device": {
            f"{p}+{o}": _state_dict(rank_state_bytes(cfg, ParallelConfig(), p, o, specs=specs),
                                    compute_copy=2 * counts.total if p in ("bf16", "fp16") else 0)
            for p, o in (("fp32", "adamw"), ("bf16", "adamw"), ("bf16", "adamw8bit"), ("bf16-pure", "adamw8bit"))
        },
    }
    if getattr(config, "cube", None) is None:
        seq = seq or cfg.trained_context
        plan = memory_plan(cfg, parallel, precision, optimizer, checkpointing, seq, micro_batch)
        report["memory_per_gpu"] = {**{k: v for k, v in asdict(plan).items() if k != "activation_per_layer"},
                                    "total": plan.total}
        report["activation_bytes_per_layer"] = {k: int(v) for k, v in plan.activation_per_layer.items()}
        report["flops_per_token"] = flops_per_token(cfg, seq)
        report["seq"] = seq
    return report


def _state_dict(state: StateBytes, compute_copy: int = 0) -> dict[str, int]:
    """Bytes of one device's training state; ``compute_copy``: the 16-bit weights mixed precision casts to."""
    return {"weights": state.weights, "grads": state.grads, "optimizer": state.optimizer,
            "compute_copy": compute_copy, "total": state.total + compute_copy}


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


# --- the config solver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolveRequest:
    """A target parameter count and the dimensions to hold fixed (None = free).

    Free dimensions are searched: ``hidden`` over ``heads x head_dim`` with head_dim a multiple of 8
    (or ``head_dim`` when given; 128 when heads are free too), ``layers`` over 1..256, ``ffn`` solved in
    closed form and rounded to a multiple of 64, ``kv_heads`` = heads when free (no GQA).
    """

    params: float
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    hidden: int | None = None
    ffn: int | None = None
    head_dim: int | None = None
    vocab_size: int = 32000
    tied_embeddings: bool = False
    tolerance: float = 5e-4
    ffn_ratio: float = 8 / 3
    near_hidden: int | None = None
    aspect: float = 128.0
    family: str = "llama"  # a key of FAMILY_OPTIONS: its biases / q-k norms are counted and set


@dataclass(frozen=True)
class SolveResult:
    model: ModelConfig
    params: int
    error: float
    alternatives: list[tuple[int, ModelConfig]]


def _shape_cost(req: SolveRequest, layers: int, hidden: int, ffn: int) -> float:
    """How far a shape is from the preferences: ffn/hidden near ``ffn_ratio`` (Llama's 8/3), hidden near
    ``near_hidden`` when given, hidden/layers near ``aspect`` when layers are free (Llama 7B/13B: 128)."""
    cost = abs(math.log(ffn / hidden / req.ffn_ratio))
    if req.near_hidden:
        cost += abs(math.log(hidden / req.near_hidden))
    if req.layers is None:
        cost += abs(math.log(hidden / layers / req.aspect))
    return cost


def _check_request(req: SolveRequest) -> None:
    for name in ("layers", "heads", "kv_heads", "hidden", "ffn", "head_dim", "vocab_size", "near_hidden"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value} must be a positive integer")
    if req.params <= 0:
        raise ConfigError(f"params={req.params:g} must be positive")
    if req.family not in FAMILY_OPTIONS:
        raise ConfigError(f"family={req.family!r} is not known; allowed: {', '.join(FAMILY_OPTIONS)}")
    if req.ffn is not None and req.ffn % 64:
        raise ConfigError(f"ffn={req.ffn} is not a multiple of 64; choose one (e.g. {round(req.ffn / 64) * 64 or 64})")
    if req.head_dim is not None and req.head_dim % 8:
        raise ConfigError(f"head_dim={req.head_dim} is not a multiple of 8")
    if req.heads and req.kv_heads and req.heads % req.kv_heads:
        raise ConfigError(f"heads={req.heads} is not divisible by kv_heads={req.kv_heads}; kv_heads must divide heads")
    if req.hidden and req.heads:
        head_dim = req.hidden / req.heads
        if req.hidden % req.heads or head_dim % 8 or (req.head_dim and head_dim != req.head_dim):
            step = req.heads * 8
            below, above = max(step, req.hidden // step * step), (req.hidden // step + 1) * step
            raise ConfigError(f"hidden={req.hidden} with heads={req.heads} gives head_dim={head_dim:g}, not a multiple "
                              f"of 8; nearest valid hidden: {below} or {above}")


def _candidate_dims(req: SolveRequest) -> list[tuple[int, int, int]]:
    """(hidden, heads, kv_heads) combinations to try."""
    combos = []
    if req.heads is not None:
        head_dims = [req.hidden // req.heads] if req.hidden else ([req.head_dim] if req.head_dim else range(8, 1025, 8))
        for head_dim in head_dims:
            combos.append((req.heads * head_dim, req.heads, req.kv_heads or req.heads))
        return combos
    head_dim = req.head_dim or 128
    hiddens = [req.hidden] if req.hidden else [head_dim * k for k in range(1, 257)]
    for hidden in hiddens:
        if hidden % head_dim:
            raise ConfigError(f"hidden={hidden} is not a multiple of head_dim={head_dim}; give --heads or --head-dim")
        heads = hidden // head_dim
        if req.kv_heads and heads % req.kv_heads:
            continue
        combos.append((hidden, heads, req.kv_heads or heads))
    return combos


def solve(req: SolveRequest) -> SolveResult:
    """The valid config nearest to ``req.params``: among shapes within ``tolerance`` (relative) of the
    target, the one closest to the shape preferences; refuses (ConfigError) when none is that close."""
    _check_request(req)
    found: list[tuple[float, int, dict[str, Any]]] = []
    nearest: tuple[float, int] | None = None
    embedding_copies = 1 if req.tied_embeddings else 2
    options = FAMILY_OPTIONS[req.family]
    for hidden, heads, kv_heads in _candidate_dims(req):
        head_dim = hidden // heads
        attention = 2 * hidden + hidden * 2 * head_dim * (heads + kv_heads)  # norms + q, k, v, o per layer
        attention += head_dim * (heads + 2 * kv_heads) * options.get("qkv_bias", False)
        attention += 2 * head_dim * options.get("qk_norm", False)
        for layers in [req.layers] if req.layers else range(1, 257):
            without_ffn = req.vocab_size * hidden * embedding_copies + layers * attention + hidden
            per_unit = 3 * hidden * layers  # params added by one more ffn unit in every layer
            if req.ffn:
                ffns = [req.ffn]
            else:
                units = (req.params - without_ffn) / per_unit / 64
                ffns = sorted({max(1, math.floor(units)) * 64, max(1, math.ceil(units)) * 64})
            for ffn in ffns:
                total = without_ffn + per_unit * ffn
                error = abs(total - req.params) / req.params
                if nearest is None or error < nearest[0]:
                    nearest = (error, total)
                if error <= req.tolerance:
                    dims = dict(vocab_size=req.vocab_size, hidden=hidden, layers=layers, heads=heads,
                                kv_heads=kv_heads, ffn=ffn, tied_embeddings=req.tied_embeddings, **options)
                    found.append((_shape_cost(req, layers, hidden, ffn), total, dims))
    if not found:
        best = f"; the nearest valid shape has {nearest[1]:,} params ({nearest[0]:.2%} off)" if nearest else ""
        raise ConfigError(f"params={req.params:g}: no valid config within tolerance={req.tolerance:g} with the fixed "
                          f"dimensions{best}; free a dimension or raise --tolerance")
    found.sort(key=lambda item: (item[0], abs(item[1] - req.params)))
    (_, total, dims), others = found[0], found[1:6]
    return SolveResult(ModelConfig(**dims), total, (total - req.params) / req.params,
                       [(t, ModelConfig(**d)) for _, t, d in others])


# --- checks and output ----------------------------------------------------------------------------------


def create_memory_bytes(config: Config) -> int:
    """RAM ``sapwood create`` needs: fp32 weights, twice (safetensors serializes a copy while writing)."""
    return 2 * 4 * config_param_counts(config).total


def check_create_fits(config: Config, available_bytes: int | None = None) -> None:
    """Refuse (one line) before anything is allocated when the model will not fit in RAM."""
    import psutil

    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    needed = create_memory_bytes(config)
    if needed > available:
        raise ConfigError(f"{config.name}: creating it needs {needed / 1e9:,.1f} GB of RAM "
                          f"({config_param_counts(config).total:,} fp32 parameters, x2 while writing) but only "
                          f"{available / 1e9:,.1f} GB is available; size it with `sapwood size` instead")


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
        table.add_row(f"one device, {precision_label(combo)}", f"weights {_gb(state['weights'])} + grads "
                      f"{_gb(state['grads'])} + optimizer {_gb(state['optimizer'])}{copy} = {_gb(state['total'])}")
    if "memory_per_gpu" in report:
        mem = report["memory_per_gpu"]
        table.add_row("activations per layer (Korthikanti)",
                      ", ".join(f"{CHECKPOINTING_LABELS.get(k, k)} {_gb(v)}"
                                for k, v in report["activation_bytes_per_layer"].items()))
        table.add_row(f"per GPU ({precision_label(mem['precision'] + '+' + mem['optimizer'])}, activation_checkpointing "
                      f"{CHECKPOINTING_LABELS.get(mem['checkpointing'], mem['checkpointing'])}, "
                      f"seq {mem['seq']}, micro-batch {mem['micro_batch']})",
                      f"weights {_gb(mem['weights'])} + grads {_gb(mem['grads'])} + optimizer "
                      f"{_gb(mem['optimizer_state'])} + 16-bit copy {_gb(mem['compute_copy'])} + activations "
                      f"{_gb(mem['activations'])} = {_gb(mem['total'])}")
        table.add_row("training FLOPs per token", f"{report['flops_per_token']:.4g}")
    console.print(table)


# Korthikanti's recomputation names -> the YAML's train.activation_checkpointing values
CHECKPOINTING_LABELS = {"full": "every_layer", "selective": "selective (attention core)"}
YAML_CHECKPOINTING = {"every_layer": "full", "every_k": "full"}  # every_k: counted as every_layer (upper bound)


def precision_label(combo: str) -> str:
    """``bf16+adamw`` -> ``bf16 mixed (fp32 master) + AdamW``: one wording for every memory figure."""
    precision, _, optimizer = combo.partition("+")
    names = {"fp32": "fp32", "bf16": "bf16 mixed (fp32 master)", "fp16": "fp16 mixed (fp32 master)",
             "bf16-pure": "pure bf16"}
    optimizers = {"adamw": "AdamW", "adamw8bit": "8-bit AdamW", "sgd": "SGD"}
    return f"{names.get(precision, precision)} + {optimizers.get(optimizer, optimizer)}"


def _short(count: float) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def presets_table(reports: list[dict[str, Any]]) -> Any:
    """One row per preset: exact parameter count, single-device fp32 AdamW state, per-GPU memory."""
    from rich.table import Table

    table = Table("preset", "params (exact)", "non-embed.", "fp32 AdamW on 1 device", "plan",
                  "per GPU (bf16 mixed + AdamW, every_layer)", "FLOPs/token", title="sapwood presets")
    for r in reports:
        par = r["parallel"]
        table.add_row(r["name"], f"{r['params_total']:,}", _short(r["params_non_embedding"]),
                      _gb(r["training_state_bytes_single_device"]["fp32+adamw"]["total"]),
                      f"tp{par['tp']} pp{par['pp']} dp{par['dp_replicate'] * par['dp_shard']}",
                      _gb(r["memory_per_gpu"]["total"]) if "memory_per_gpu" in r else "-",
                      f"{r['flops_per_token']:.3g}" if "flops_per_token" in r else "-")
    return table


def demo_stage(out: Any) -> None:
    """Demo: the sizing of every preset as one table, then the tiny model created in ``OUT/tiny``,
    loaded back and run forward."""
    from pathlib import Path

    import torch
    from rich.console import Console

    from sapwood.config import load_config, preset_names
    from sapwood.model import build_model, load, save_folder

    console = Console(width=max(Console().width, 140))
    reports = [size_report(load_config(name), precision="bf16", checkpointing="full") for name in preset_names()]
    console.print(presets_table(reports))
    config = load_config("tiny")
    check_create_fits(config)
    torch.manual_seed(0)
    folder = save_folder(build_model(config), config, Path(out) / "tiny")
    model = load(folder)
    tokens = torch.randint(0, config.model.vocab_size, (2, 16))
    with torch.no_grad():
        logits = model(tokens)
    console.print(f"created {folder} ({count_params(config.model).total:,} parameters); forward pass on "
                  f"tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}, finite: {bool(logits.isfinite().all())}")
