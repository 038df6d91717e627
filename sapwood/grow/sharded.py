"""Growth of an FSDP2-sharded model: gather the full state, grow a plain copy, shard it again.

Every rank (collectively) gathers the full model and optimizer state, rebuilds a plain decoder of the
current shape, grows it together with a plain optimizer's state (the same operators and surgery as
single-process growth, with the same random generator on every rank, so all ranks agree), shards the
grown model with ``fully_shard`` (per block, then the root) and finally puts the grown state back into
the EXISTING optimizer: its groups receive the new sharded parameters and their state is sharded like
them, so the LR scheduler and grad scaler holding that optimizer simply go on. The caller replaces its
model reference with the returned module.

:func:`grow_sharded_masked` does the same with masked growth (``sapwood.grow.masked``): the mask hooks sit
on the plain copy's modules before it is sharded, so they act on the sharded model's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from sapwood.config import ModelConfig
from sapwood.grow.masked import GrowthMasks, grow_model_masked
from sapwood.grow.plan import GrowthRequest, grow_model
from sapwood.model.folder import materialize
from sapwood.model.transformer import Decoder

ShardFn = Callable[[nn.Module], None]


def default_shard_fn(mesh) -> ShardFn:
    """``fully_shard`` each block, then the root, on ``mesh`` (what sapwood.train.parallel does in fp32)."""

    def shard(model: nn.Module) -> None:
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    return shard


def _plain_copy(cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device) -> Decoder:
    with torch.device("meta"):
        model = Decoder(cfg)
    materialize(model, device)  # buffers (rope) and the tied head; the parameters are then loaded
    model.load_state_dict(state, strict=False)
    return model


def grow_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer, request: GrowthRequest,
    generator: torch.Generator | None = None, shard_fn: ShardFn | None = None,
) -> nn.Module:
    """Grow the FSDP2 ``model`` (collective: every rank calls it) and return the grown sharded model."""

    def grow(plain: Decoder, plain_optimizer: torch.optim.Optimizer) -> None:
        grow_model(plain, request, plain_optimizer, generator=generator)

    return _grow_gathered(model, optimizer, grow, shard_fn)[0]


def grow_sharded_masked(
    model: nn.Module, optimizer: torch.optim.Optimizer, request: GrowthRequest, ramp_steps: int,
    generator: torch.Generator | None = None, shard_fn: ShardFn | None = None,
) -> tuple[nn.Module, GrowthMasks]:
    """Masked growth of the FSDP2 ``model`` (collective); returns the grown sharded model and its masks."""

    def grow(plain: Decoder, plain_optimizer: torch.optim.Optimizer) -> GrowthMasks:
        return grow_model_masked(plain, request, ramp_steps, plain_optimizer, generator)[0]

    return _grow_gathered(model, optimizer, grow, shard_fn)


def _grow_gathered(
    model: nn.Module, optimizer: torch.optim.Optimizer, grow: Callable[[Decoder, torch.optim.Optimizer], Any],
    shard_fn: ShardFn | None,
) -> tuple[nn.Module, Any]:
    """Gather ``model`` and ``optimizer`` into plain copies, ``grow`` them, shard the grown model and put
    the grown, sharded state into ``optimizer``; returns the sharded model and what ``grow`` returned."""
    first = next(p for p in model.parameters() if isinstance(p, DTensor))
    mesh = first.device_mesh
    device = first.to_local().device
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    full_model = get_model_state_dict(model, options=options)
    full_optim = get_optimizer_state_dict(model, optimizer, options=options)
    plain = _plain_copy(model.cfg, full_model, device)
    named = dict(plain.named_parameters())
    plain_groups = []
    for group in full_optim["param_groups"]:
        settings = {k: v for k, v in group.items() if k != "params"}
        plain_groups.append(
            {**settings, "params": [named[name] for name in group["params"] if name in named]}
        )
    plain_optimizer = torch.optim.AdamW(plain_groups)
    for name, state in full_optim["state"].items():
        if name in named:
            plain_optimizer.state[named[name]] = dict(state)
    grown = grow(plain, plain_optimizer)
    name_of = {id(p): n for n, p in plain.named_parameters()}
    group_names = [[name_of[id(p)] for p in group["params"]] for group in plain_optimizer.param_groups]
    grown_state = {name_of[id(p)]: state for p, state in plain_optimizer.state.items()}
    (shard_fn or default_shard_fn(mesh))(plain)
    sharded = dict(plain.named_parameters())
    # the existing optimizer takes the grown groups and the state sharded like each new parameter
    optimizer.state.clear()
    for group, names in zip(optimizer.param_groups, group_names, strict=True):
        group["params"] = [sharded[name] for name in names]
    for name, state in grown_state.items():
        param = sharded[name]
        optimizer.state[param] = {
            key: distribute_tensor(value, param.device_mesh, param.placements)
            if isinstance(value, torch.Tensor) and value.dim() > 0
            else value
            for key, value in state.items()
        }
    return plain, grown
