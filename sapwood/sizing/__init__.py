"""Sizing without allocation: exact parameter counts, training memory per GPU, FLOPs per token, MFU,
the config solver, and a measured training step to check the memory plan against.

Everything but :mod:`sapwood.sizing.measure` is arithmetic on the config (no tensors), so a 400B
preset is sized in microseconds. Modules: :mod:`~sapwood.sizing.count` (parameters),
:mod:`~sapwood.sizing.memory` (training state per rank, activations, the per-GPU plan),
:mod:`~sapwood.sizing.flops` (FLOPs, MFU, peak FLOP/s per device), :mod:`~sapwood.sizing.solve`
(``sapwood solve``), :mod:`~sapwood.sizing.report` (``sapwood size`` output, the ``create`` check)
and :mod:`~sapwood.sizing.measure` (one training step on fake tensors under torch's memory tracker).
The names below are re-exported so ``from sapwood.sizing import X`` keeps working.
"""

from sapwood.sizing.count import (
    ParamCounts,
    ParamSpec,
    config_param_counts,
    config_param_specs,
    count_params,
    layer_params,
    parameter_shapes,
)
from sapwood.sizing.flops import PEAK_FLOPS, flops_per_token, mfu, peak_flops
from sapwood.sizing.memory import (
    GIB,
    OPTIMIZERS,
    PRECISIONS,
    QUANT_BLOCK,
    MemoryPlan,
    StateBytes,
    activation_bytes_per_layer,
    memory_plan,
    optimizer_bytes,
    padded_param_numel,
    pipeline_in_flight,
    rank_params,
    rank_state_bytes,
    shard_length,
    stage_layers,
    training_memory_bytes,
    weight_bytes_per_param,
)
from sapwood.sizing.report import (
    check_create_fits,
    create_memory_bytes,
    presets_table,
    print_size_report,
    size_report,
)
from sapwood.sizing.solve import SolveRequest, SolveResult, solve

__all__ = [
    "GIB", "OPTIMIZERS", "PEAK_FLOPS", "PRECISIONS", "QUANT_BLOCK", "MemoryPlan", "ParamCounts", "ParamSpec",
    "SolveRequest", "SolveResult", "StateBytes", "activation_bytes_per_layer", "check_create_fits",
    "config_param_counts", "config_param_specs", "count_params", "create_memory_bytes", "flops_per_token",
    "layer_params", "memory_plan", "mfu", "optimizer_bytes", "padded_param_numel", "parameter_shapes",
    "peak_flops", "pipeline_in_flight", "presets_table", "print_size_report", "rank_params",
    "rank_state_bytes", "shard_length", "size_report", "solve", "stage_layers", "training_memory_bytes",
    "weight_bytes_per_param",
]
