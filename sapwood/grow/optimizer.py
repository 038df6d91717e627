"""Optimizer-state surgery after growth, done in place on the existing optimizer.

The optimizer object stays the same, so an LR scheduler (and a GradScaler) holding it simply go on.
For every replaced parameter the new one takes its place in its parameter group and inherits its state:
tensors shaped like the parameter (AdamW's ``exp_avg`` / ``exp_avg_sq``) are extended with zeros for the
new entries, everything else (``step``) is kept. Brand-new parameters (new blocks) join the group of a
sibling parameter with a fresh state (zero moments, step 0), as if the optimizer had never seen them. Each
group's parameters are then put in the model's parameter order, so an optimizer rebuilt on the grown model
after a resume lists them in the same order and loads the saved state onto the right tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from sapwood.grow.operators import ParamChange, embed_into


def _extended_state(state: dict, change: ParamChange) -> dict:
    old_shape = change.old.shape
    grown = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old_shape and value.dim() > 0:
            new_shape = change.new.shape
            grown[key] = embed_into(value, new_shape, change.placement).to(value.dtype)
        else:
            grown[key] = value
    return grown


def _fresh_state(sibling_state: dict, change: ParamChange) -> dict:
    """The state of a parameter the optimizer has not stepped yet (zero moments, step 0), shaped like the
    sibling's; written out so a checkpoint taken before the next step resumes exactly."""
    fresh = {}
    for key, value in sibling_state.items():
        if isinstance(value, torch.Tensor):
            shape = (
                change.new.shape if value.shape == change.sibling.shape and value.dim() > 0 else value.shape
            )
            fresh[key] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        elif isinstance(value, int | float):
            fresh[key] = type(value)(0)
        else:
            fresh[key] = value
    return fresh


def apply_changes_to_optimizer(
    optimizer: torch.optim.Optimizer, changes: list[ParamChange], model: nn.Module | None = None
) -> None:
    """Carry ``optimizer``'s groups and state over to the parameters of ``changes``."""
    group_of: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            group_of[id(param)] = group
    for change in changes:
        if change.old is not None and id(change.old) in group_of:
            group = group_of.pop(id(change.old))
            group["params"] = [change.new if p is change.old else p for p in group["params"]]
            group_of[id(change.new)] = group
            state = optimizer.state.pop(change.old, None)
            if state:
                optimizer.state[change.new] = _extended_state(state, change)
            change.old.grad = None
        elif change.old is None and change.sibling is not None and id(change.sibling) in group_of:
            group = group_of[id(change.sibling)]
            group["params"].append(change.new)
            group_of[id(change.new)] = group
            sibling_state = optimizer.state.get(change.sibling)
            if sibling_state:
                optimizer.state[change.new] = _fresh_state(sibling_state, change)
    if model is not None:
        order = {id(p): i for i, p in enumerate(model.parameters())}
        for group in optimizer.param_groups:
            group["params"].sort(key=lambda p: order.get(id(p), len(order)))


def check_optimizer_matches(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Problems between the optimizer and the model (empty when every state tensor fits its parameter)."""
    problems = []
    model_params = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in model_params:
                problems.append(f"optimizer holds a parameter of shape {tuple(param.shape)} not in the model")
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    problems.append(f"state {key} {tuple(value.shape)} != parameter {tuple(param.shape)}")
    return problems
