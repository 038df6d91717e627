"""Apply parallelism to a Decoder from outside the model code, the torchtitan way.

Order is fixed: pipeline split (each rank keeps its stage's layers) → tensor parallel → activation
checkpointing → ``torch.compile`` per block → FSDP2 per block and at the root. Each step is one
function below; :func:`parallelize` runs them from a :class:`~sapwood.train.mesh.ParallelDims` and
returns a :class:`ParallelModel` whose :meth:`ParallelModel.forward_backward` is the one call the
training loop makes per micro-batch (plain forward/backward, or a pipeline schedule step).

Tensor-parallel plan per block (Megatron style, with sequence parallel around the norms):
``wq/wk/wv/w1/w3`` column-wise, ``wo/w2`` row-wise (reduce-scatter back to sequence shards),
``attention_norm/ffn_norm/norm`` sequence-parallel, ``tok_embeddings`` vocab-parallel (row-wise) and
``output`` vocab-parallel (column-wise, logits gathered so any loss works unchanged).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from sapwood.config import Config, ModelConfig
from sapwood.errors import ConfigError
from sapwood.model.transformer import tie_head
from sapwood.train.activation import apply_activation_checkpointing
from sapwood.train.context_parallel import apply_context_parallel, check_divisible
from sapwood.train.mesh import ParallelDims, parallel_dims_for

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --- checks -------------------------------------------------------------------------------------


def check_parallel_fits_model(cfg: ModelConfig, dims: ParallelDims) -> None:
    """One-line :class:`ConfigError` when the model's shape cannot be split by the degrees."""
    tp, pp = dims.tp, dims.pp
    if dims.parallel.cp > 1 and pp > 1:
        raise ConfigError(
            f"parallel.cp={dims.parallel.cp} with parallel.pp={pp} is not supported (a pipeline stage "
            "without the embedding cannot shard its sequence); use cp with dp_shard and tp"
        )
    if tp > 1:
        for name, value in (("kv_heads", cfg.kv_heads), ("heads", cfg.heads), ("ffn", cfg.ffn),
                            ("vocab_size", cfg.vocab_size)):
            if value % tp:
                raise ConfigError(f"model.{name}={value} is not divisible by parallel.tp={tp}; "
                                  f"tensor parallel needs {name} to be a multiple of tp")
        if cfg.qk_norm:
            raise ConfigError(
                f"model.qk_norm=true with parallel.tp={tp} is not supported (the q/k norm gains would "
                "see only each rank's heads); use tp: 1 with dp_shard for this model"
            )
    if pp > 1:
        stages = pp * (2 if dims.parallel.pp_schedule == "interleaved_1f1b" else 1)
        if cfg.layers < stages:
            raise ConfigError(
                f"model.layers={cfg.layers} is fewer than the {stages} pipeline stages of "
                f"parallel.pp={pp} ({dims.parallel.pp_schedule}); need at least one layer per stage"
            )
        if cfg.tied_embeddings:
            raise ConfigError(
                "model.tied_embeddings=true with parallel.pp>1: the embedding and the head live on "
                "different pipeline stages; set tied_embeddings: false or pp: 1"
            )


# --- pipeline split -----------------------------------------------------------------------------


def stage_layer_ids(num_layers: int, num_stages: int) -> list[list[int]]:
    """Split layer indices ``0..num_layers-1`` into ``num_stages`` contiguous runs (earlier runs get
    the remainder): ``stage_layer_ids(5, 2) == [[0, 1, 2], [3, 4]]``."""
    base, extra = divmod(num_layers, num_stages)
    ids, start = [], 0
    for stage in range(num_stages):
        count = base + (1 if stage < extra else 0)
        ids.append(list(range(start, start + count)))
        start += count
    return ids


def stage_indices(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The pipeline stages this rank runs: one, or two (``rank`` and ``rank + pp``) when interleaved."""
    return [pp_rank, pp_rank + pp] if schedule == "interleaved_1f1b" else [pp_rank]


def prune_to_stage(model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> nn.Module:
    """Keep only ``layer_ids``; drop the embedding unless ``first`` and the norm and head unless
    ``last``. Layer names are kept, so state-dict keys match the full model."""
    for name in list(model.layers.keys()):
        if int(name) not in layer_ids:
            del model.layers[name]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


# --- the steps, in order ------------------------------------------------------------------------


def _full_positions_hook(tp: int) -> Callable:
    """Forward pre-hook giving the model explicit positions ``0..seq-1`` of the *full* sequence:
    under sequence parallel a stage without an embedding receives only its ``seq / tp`` slice."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("positions") is None and (len(args) < 2 or args[1] is None):
            x = args[0]
            seq = x.shape[1] * (tp if module.tok_embeddings is None else 1)
            kwargs = dict(kwargs, positions=torch.arange(seq, device=x.device).unsqueeze(0))
        return args, kwargs

    return hook


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard the model over ``tp_mesh`` with DTensor: column-wise q/k/v/gate/up, row-wise o/down,
    sequence-parallel norms, vocab-parallel embedding and head (logits gathered, replicated)."""
    tied = (
        getattr(model.cfg, "tied_embeddings", False)
        and model.tok_embeddings is not None
        and model.output is not None
    )
    root_plan = {}
    if model.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        root_plan["norm"] = SequenceParallel()
    if model.output is not None:
        root_plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    parallelize_module(model, tp_mesh, root_plan)
    if tied:
        tie_head(model)  # both vocab-sharded on dim 0: re-tie the DTensor
    attention_inputs = (Shard(1),) + (None,) * 5  # x, cos, sin, kv_cache, layer_index, causal
    block_plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=attention_inputs,
                                        desired_input_layouts=(Replicate(),) + (None,) * 5),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)
    model.register_forward_pre_hook(_full_positions_hook(tp_mesh.size()), with_kwargs=True)


def apply_compile(model: nn.Module, backend: str = "inductor") -> list[str]:
    """``torch.compile`` each block in place (same names; the blocks are identical so one graph).
    Idempotent: blocks already compiled are left alone, so it can run again after growth adds
    blocks. Returns the names of the compiled blocks."""
    for block in model.layers.values():
        if not is_compiled(block):
            block.compile(fullgraph=False, backend=backend)
    return [name for name, block in model.layers.items() if is_compiled(block)]


def is_compiled(module: nn.Module) -> bool:
    """True when ``module.compile()`` was applied to it."""
    return getattr(module, "_compiled_call_impl", None) is not None


def fsdp_policies(precision: str, cpu_offload: bool) -> tuple[MixedPrecisionPolicy, OffloadPolicy]:
    """bf16/fp16 parameters with fp32 gradient reduction when training in low precision; optional
    CPU offload of parameters, gradients and optimizer state."""
    dtype = PRECISION_DTYPES.get(precision)
    mp = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if dtype
        else MixedPrecisionPolicy()
    )
    return mp, (CPUOffloadPolicy() if cpu_offload else OffloadPolicy())


def apply_fsdp(model: nn.Module, dp_mesh, precision: str = "fp32", cpu_offload: bool = False,
               reshard_after_forward: bool = True) -> None:
    """FSDP2 ``fully_shard`` per block, then at the root (embedding, final norm and head)."""
    mp, offload = fsdp_policies(precision, cpu_offload)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once in backward: keep them gathered.
        keep = reshard_after_forward and index < len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=keep)
    fully_shard(
        model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward
    )


# --- the result ---------------------------------------------------------------------------------


@dataclass
class ParallelModel:
    """The model parts this rank holds (one, or two virtual pipeline stages) and how to step them."""

    parts: list[nn.Module]
    dims: ParallelDims
    loss_fn: LossFn | None = None  # loss(output, targets): a pipeline's last stage and forward_backward
    schedule: object | None = field(default=None, repr=False)
    stage_ids: list[int] = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        """The single model part (every layout except interleaved pipelines): the whole model, or
        this rank's pipeline stage (the pruned Decoder, full-model parameter names)."""
        if len(self.parts) != 1:
            raise RuntimeError("this rank holds several pipeline stages; use .parts")
        return self.parts[0]

    @model.setter
    def model(self, module: nn.Module) -> None:
        """Replace the single part (growth rebuilds a sharded model)."""
        if len(self.parts) != 1:
            raise RuntimeError("this rank holds several pipeline stages; use .parts")
        self.parts = [module]

    @property
    def pipelined(self) -> bool:
        """True when a pipeline schedule steps this model (``parallel.pp > 1``)."""
        return self.schedule is not None

    def __call__(self, *inputs: torch.Tensor, **options: Any) -> torch.Tensor:
        """The whole model's forward on every layout: the model itself (with its keyword options, e.g.
        ``positions``), or the pipeline's forward-only schedule (every pipeline rank passes the same
        single input tensor and gets the same output)."""
        if self.pipelined:
            if len(inputs) != 1 or options:
                raise ValueError(
                    f"a pipeline forward takes one input tensor and no options, got {len(inputs)} "
                    f"inputs and options {sorted(options)}"
                )
            return self.forward_only(inputs[0])
        return self.model(*inputs, **options)

    def get_buffer(self, name: str) -> torch.Tensor:
        """The buffer ``name`` (as ``nn.Module.get_buffer``) from the part that holds it."""
        for part in self.parts:
            with contextlib.suppress(AttributeError):
                return part.get_buffer(name)
        raise AttributeError(f"no part of this model has a buffer {name!r}")

    def parameters(self) -> Iterator[nn.Parameter]:
        for part in self.parts:
            yield from part.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for part in self.parts:
            yield from part.named_parameters()

    def train(self, mode: bool = True) -> ParallelModel:
        for part in self.parts:
            part.train(mode)
        return self

    def eval(self) -> ParallelModel:
        return self.train(False)

    @property
    def has_first_stage(self) -> bool:
        return not self.dims.pp_enabled or 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return not self.dims.pp_enabled or self.num_stages - 1 in self.stage_ids

    @property
    def num_stages(self) -> int:
        return self.dims.pp * (2 if self.dims.parallel.pp_schedule == "interleaved_1f1b" else 1)

    def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float = 1.0
    ) -> torch.Tensor:
        """Forward and backward one micro-batch with ``loss_fn(output, targets)``; returns the detached
        mean loss (the same on every rank; the pipeline's last stage broadcasts it). ``loss_scale``
        multiplies the loss before backward (1 / accumulation steps, times the fp16 loss scale)."""
        if self.schedule is None:
            loss = self.loss_fn(self.model(inputs), targets)
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            return loss.detach()
        losses: list[torch.Tensor] = []
        scaled_fn = (
            self.loss_fn if loss_scale == 1.0 else (lambda out, tgt: self.loss_fn(out, tgt) * loss_scale)
        )
        self.schedule._loss_fn = scaled_fn
        kwargs = {"target": targets, "losses": losses} if self.has_last_stage else {}
        args = (inputs,) if self.has_first_stage else ()
        self.schedule.step(*args, **kwargs)
        device = next(self.parameters()).device
        loss = (torch.stack([x.detach().float() for x in losses]).mean() / loss_scale
                if self.has_last_stage else torch.zeros((), device=device))
        dist.all_reduce(loss, group=self.dims.submesh("pp").get_group())  # only the last stage is nonzero
        return loss

    def forward_only(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of the whole pipeline on every pipeline rank (forward-only
        schedule; the last stage broadcasts its output). Every rank passes the same ``inputs``."""
        loss_fn, self.schedule._loss_fn = self.schedule._loss_fn, None  # 1F1B would compute a loss
        try:
            output = self.schedule.eval(inputs) if self.has_first_stage else self.schedule.eval()
        finally:
            self.schedule._loss_fn = loss_fn
        vocab = self.parts[-1].cfg.vocab_size
        if not self.has_last_stage or output is None:
            output = torch.empty(inputs.shape[0], inputs.shape[1], vocab, device=inputs.device)
        output = output.float().contiguous()
        pp_mesh = self.dims.submesh("pp")
        last_rank = dist.get_global_rank(pp_mesh.get_group(), self.dims.pp - 1)
        dist.broadcast(output, src=last_rank, group=pp_mesh.get_group())
        return output

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm over every rank and stage; returns the norm before clipping."""
        return clip_grad_norm_(list(self.parameters()), max_norm, self.dims)


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` across DTensor shards and pipeline stages."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if dims.pp_enabled:
        squared = norm.pow(2)
        dist.all_reduce(squared, group=dims.submesh("pp").get_group())
        norm = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def _build_pipeline(model: nn.Module, dims: ParallelDims, device: torch.device, loss_fn: LossFn,
                    transform: Callable[[nn.Module], None]) -> ParallelModel:
    """One pruned copy of ``model`` per stage of this rank, each parallelized by ``transform``,
    wrapped in PipelineStage objects and a schedule (1F1B, GPipe or interleaved 1F1B)."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    par = dims.parallel
    stage_ids = stage_indices(dims.pp_rank, dims.pp, par.pp_schedule)
    num_stages = dims.pp * len(stage_ids)
    layer_ids = stage_layer_ids(model.cfg.layers, num_stages)
    pp_group = dims.submesh("pp").get_group()
    parts, stages = [], []
    for stage_id in stage_ids:
        part = model if len(stage_ids) == 1 else copy.deepcopy(model)
        prune_to_stage(part, layer_ids[stage_id], first=stage_id == 0, last=stage_id == num_stages - 1)
        transform(part)
        parts.append(part)
        stages.append(PipelineStage(part, stage_id, num_stages, device, group=pp_group))
    if par.pp_schedule == "interleaved_1f1b":
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=par.pp_microbatches, loss_fn=loss_fn)
    else:
        cls = Schedule1F1B if par.pp_schedule == "1f1b" else ScheduleGPipe
        schedule = cls(stages[0], n_microbatches=par.pp_microbatches, loss_fn=loss_fn)
    return ParallelModel(parts=parts, dims=dims, loss_fn=loss_fn, schedule=schedule, stage_ids=stage_ids)


def parallelize(
    model: nn.Module, dims: ParallelDims, loss_fn: LossFn | None, device: torch.device | str = "cpu",
    precision: str = "fp32", activation_checkpointing: str = "none", checkpoint_every_k: int = 2,
    compile: bool = False,
) -> ParallelModel:
    """Apply the config's parallelism to ``model`` (a Decoder on ``device``) in the fixed order
    PP split → TP → activation checkpointing → compile → FSDP. With one process it only applies
    activation checkpointing and compile. ``model`` is changed in place (pruned under PP)."""
    device = torch.device(device)
    check_parallel_fits_model(model.cfg, dims)
    if dims.parallel.cpu_offload and device.type == "cpu":
        raise ConfigError("parallel.cpu_offload=true needs a GPU (FSDP2 offloads GPU parameters to the CPU); "
                          "set cpu_offload: false for a CPU run")

    def transform(part: nn.Module) -> None:
        if dims.parallel.cp > 1:  # before TP: its input hook shards the tokens and sets their positions
            apply_context_parallel(part, dims.submesh("cp").get_group())
        if dims.tp_enabled:
            apply_tensor_parallel(part, dims.submesh("tp"))
        apply_activation_checkpointing(part, activation_checkpointing, checkpoint_every_k)
        if compile:
            apply_compile(part)
        if dims.fsdp_enabled:
            apply_fsdp(part, dims.fsdp_mesh(), precision, dims.parallel.cpu_offload,
                       reshard_after_forward=not dims.pp_enabled)

    if dims.pp_enabled:
        return _build_pipeline(model, dims, device, loss_fn, transform)
    transform(model)
    return ParallelModel(parts=[model], dims=dims, loss_fn=loss_fn)


def apply_training_parallelism(model: nn.Module, config: Config, device: torch.device,
                               loss_fn: LossFn | None = None) -> ParallelModel:
    """The training loop's one parallelism hook, for every layout including one process: parallelize
    the (meta-device) model for ``config.parallel`` and the world size torchrun set (the loop then
    materializes and initializes it). ``loss_fn(output, targets)`` is the task's loss, which a
    pipeline's last stage computes; ``None`` when the task cannot be split into stages."""
    train = config.train
    if config.parallel.pp > 1 and loss_fn is None:
        raise ConfigError(
            f"parallel.pp={config.parallel.pp}: train.task={train.task!r} has no per-output loss "
            "(split_batch / output_loss) for a pipeline's last stage; set pp: 1"
        )
    dims = parallel_dims_for(config.parallel, device.type)
    if config.parallel.cp > 1:
        if getattr(config, "cube", None) is not None:
            raise ConfigError(
                f"parallel.cp={config.parallel.cp}: the cube surrogate attends without a causal "
                "mask; context parallelism is for the language model"
            )
        data = getattr(config, "data", None)
        check_divisible(
            (data.seq_len if data is not None else None) or config.model.trained_context, config.parallel.cp
        )
    pm = parallelize(model, dims, loss_fn, device, precision=train.precision,
                     activation_checkpointing=train.activation_checkpointing,
                     checkpoint_every_k=train.checkpoint_every_k, compile=train.compile)
    if len(pm.parts) > 1:
        raise ConfigError("parallel.pp_schedule='interleaved_1f1b' is not supported by `sapwood train` yet; "
                          "use 1f1b or gpipe")
    return pm


def batch_slice(batch_size: int, dims: ParallelDims) -> slice:
    """The rows of a global batch this rank's data-parallel replica trains on."""
    if batch_size % dims.dp:
        raise ConfigError(
            f"batch of {batch_size} sequences is not divisible by the data-parallel degree {dims.dp}"
        )
    local = batch_size // dims.dp
    return slice(dims.dp_rank * local, (dims.dp_rank + 1) * local)


def full_model_state(model: ParallelModel) -> dict[str, torch.Tensor]:
    """The full, unsharded model state on CPU with the full model's names (on rank 0; on every rank
    under pipeline parallel, where stages exchange their pieces). FSDP and TP shards are gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    parts = model.parts
    pipelined = model.dims.pp_enabled
    # Without pipeline stages rank 0 alone gathers onto the CPU (the others get an empty dict).
    options = StateDictOptions(full_state_dict=True, cpu_offload=not pipelined)
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        part_state = get_model_state_dict(part, options=options)
        state.update({name: tensor.detach().cpu() for name, tensor in part_state.items()})
    if pipelined:
        pieces: list = [None] * model.dims.pp
        dist.all_gather_object(pieces, state, group=model.dims.submesh("pp").get_group())
        state = {name: tensor for piece in pieces for name, tensor in piece.items()}
    return state
