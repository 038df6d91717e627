"""Masked structural growth (after Yao et al., ICLR 2024): new parts enter through masks ramping 0 -> 1.

New weights are initialized normally (as a fresh model of the grown shape would be); every place where a
new part writes into the existing computation is multiplied by a mask ``m``:

- new blocks: the outputs of their attention ``wo`` and MLP ``w2`` (the block's residual contribution);
- new FFN units: their activations, at the input of ``w2``;
- new attention heads: their outputs, at the input of ``wo``;
- new hidden dimensions: the new embedding columns and the new rows of every ``wo`` / ``w2`` (RMSNorm
  gains and eps are rescaled as in function-preserving hidden growth, so the old dimensions' norms agree).

At ``m = 0`` the grown model computes exactly the small model's function; :meth:`GrowthMasks.step`
advances ``m`` linearly to 1 over ``ramp_steps`` optimizer steps, after which the hooks are removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sapwood.errors import SapwoodError
from sapwood.grow.operators import ParamChange, grow_depth, grow_ffn, grow_heads, grow_hidden
from sapwood.grow.optimizer import apply_changes_to_optimizer
from sapwood.grow.plan import GrowthRequest, target_config
from sapwood.model.transformer import Decoder, residual_std


@dataclass
class MaskedInput:
    """One masked place: ``module``'s output (``kind="output"``) or input (``"input"``), last-dimension
    entries ``index`` (None = all of them)."""

    module: nn.Module
    kind: str
    index: torch.Tensor | None


@dataclass
class GrowthMasks:
    """The masks of one growth event: ``value`` goes from 0 to 1 over ``ramp_steps`` calls of ``step``.

    :meth:`state_dict` / :meth:`restore` save and reinstall the masks by module name (for checkpoints taken
    mid-ramp); :meth:`fold` multiplies the current mask into the weights, giving a hook-free model with the
    same function (for a run that ends mid-ramp).
    """

    ramp_steps: int
    steps_done: int = 0
    places: list[MaskedInput] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)
    # the mask as a 0-d tensor changed in place: a compiled block reads it as an input, so the ramp
    # does not recompile it at every step (a Python float would be a constant guarded on)
    _value: torch.Tensor = field(default_factory=lambda: torch.zeros(()), repr=False)
    _value_float: float = field(default=0.0, repr=False)

    @property
    def value(self) -> float:
        return self._value_float

    @value.setter
    def value(self, value: float) -> None:
        self._value_float = value
        self._value.fill_(value)

    def step(self) -> None:
        self.steps_done += 1
        self.value = min(1.0, self.steps_done / self.ramp_steps)
        if self.value >= 1.0:
            self.remove()

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.places.clear()
        self.value = 1.0

    def _scale(self, size: int, index: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        value = self._value  # a CPU 0-d tensor: used as a scalar on any device, keeps ``like``'s dtype
        if index is None:
            return value
        new = torch.zeros(size, dtype=like.dtype, device=like.device)
        new[index.to(like.device)] = 1.0
        return 1.0 + new * (value - 1.0)  # the mask on the entries ``index``, 1 elsewhere

    def mask_output(self, module: nn.Module, index: torch.Tensor | None = None) -> None:
        """Multiply ``module``'s output (last dimension entries ``index``; all when None) by the mask."""

        def hook(_module, _inputs, output):
            return output * self._scale(output.shape[-1], index, output)

        self.places.append(MaskedInput(module, "output", index))
        self.handles.append(module.register_forward_hook(hook))

    def mask_input(self, module: nn.Module, index: torch.Tensor) -> None:
        """Multiply the entries ``index`` of the last dimension of ``module``'s input by the mask."""

        def hook(_module, inputs):
            x = inputs[0]
            return (x * self._scale(x.shape[-1], index, x), *inputs[1:])

        self.places.append(MaskedInput(module, "input", index))
        self.handles.append(module.register_forward_pre_hook(hook))

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """Plain values: ramp progress and every masked place by module name (names as they are now)."""
        names = {id(module): name for name, module in model.named_modules()}
        places = [
            {
                "module": names[id(p.module)],
                "kind": p.kind,
                "index": None if p.index is None else p.index.tolist(),
            }
            for p in self.places
        ]
        return {"ramp_steps": self.ramp_steps, "steps_done": self.steps_done, "places": places}

    @classmethod
    def restore(cls, model: nn.Module, state: dict[str, Any]) -> GrowthMasks:
        """The masks of ``state`` (from :meth:`state_dict`) installed again on ``model``."""
        masks = cls(int(state["ramp_steps"]), int(state["steps_done"]))
        masks.value = min(1.0, masks.steps_done / masks.ramp_steps)
        for place in state["places"]:
            module = model.get_submodule(place["module"])
            index = None if place["index"] is None else torch.tensor(place["index"], dtype=torch.long)
            if place["kind"] == "output":
                masks.mask_output(module, index)
            else:
                masks.mask_input(module, index)
        return masks

    @torch.no_grad()
    def fold(self, model: nn.Module) -> None:
        """Multiply the current mask into the masked weights of ``model`` and remove the hooks (same
        function). A masked embedding tied to the output head also scales the head's new columns, so the
        final norm's gain of those dimensions is divided by the mask to keep the logits. Works on plain
        and on FSDP2-sharded (DTensor) weights; with a sharded model every rank calls it."""
        value = self.value
        for place in self.places:
            module, weight = place.module, place.module.weight
            if getattr(module, "bias", None) is not None:
                raise SapwoodError(f"cannot fold a growth mask into {type(module).__name__} with a bias")
            # Linear: output entries are weight rows, input entries columns; Embedding: output entries columns
            dim = 0 if place.kind == "output" and isinstance(module, nn.Linear) else 1
            _scale_entries(weight, dim, place.index, value)
            head = getattr(model, "output", None)
            if isinstance(module, nn.Embedding) and head is not None and head.weight is weight and value > 0:
                _scale_entries(model.norm.weight, 0, place.index, 1.0 / value)
        self.remove()


def _scale_entries(weight: torch.Tensor, dim: int, index: torch.Tensor | None, factor: float) -> None:
    """Multiply the entries ``index`` (all when None) of ``weight`` along ``dim`` by ``factor``, in place;
    an FSDP2-sharded weight is gathered, scaled and its shard written back (a collective)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = isinstance(weight, DTensor)
    full = weight.full_tensor() if sharded else weight
    view = full if dim == 0 else full.transpose(0, dim)
    view[slice(None) if index is None else index.to(full.device)] *= factor
    if sharded:
        weight.to_local().copy_(distribute_tensor(full, weight.device_mesh, weight.placements).to_local())


def grow_model_masked(
    model: Decoder, request: GrowthRequest, ramp_steps: int, optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> tuple[GrowthMasks, list[ParamChange]]:
    """Grow ``model`` (and ``optimizer``) to ``request``'s shape with masked new parts; returns the masks
    (call ``masks.step()`` after every optimizer step) and the parameter changes."""
    if ramp_steps < 1:
        raise SapwoodError(f"mask ramp_steps={ramp_steps} must be >= 1")
    cfg = model.cfg
    target = target_config(cfg, request)
    masks = GrowthMasks(ramp_steps)
    all_changes: list[ParamChange] = []

    def record(changes: list[ParamChange]) -> None:
        if optimizer is not None and changes:
            apply_changes_to_optimizer(optimizer, changes, model)
        all_changes.extend(changes)

    if (target.heads, target.kv_heads) != (cfg.heads, cfg.kv_heads):
        changes = grow_heads(model, target.heads, target.kv_heads, False, generator)
        record(changes)
        for change in changes:
            if change.name.endswith("attention.wo.weight"):
                old_cols = change.placement[1]
                new_cols = torch.ones(change.new.shape[1], dtype=torch.bool)
                new_cols[old_cols.cpu()] = False
                module = model.get_submodule(change.name.removesuffix(".weight"))
                masks.mask_input(module, new_cols.nonzero().flatten())
    if target.ffn != model.cfg.ffn:
        old_ffn = model.cfg.ffn
        record(grow_ffn(model, target.ffn, False, generator))
        for block in model.layers.values():
            masks.mask_input(block.feed_forward.w2, torch.arange(old_ffn, target.ffn))
    if target.hidden != model.cfg.hidden:
        old_hidden, grown_cfg = model.cfg.hidden, model.cfg
        record(grow_hidden(model, target.hidden, True, generator))  # rescaled norms, zero new writes
        new_dims = torch.arange(old_hidden, target.hidden)
        write_std = residual_std(grown_cfg)
        with torch.no_grad():
            if model.tok_embeddings is not None:
                nn.init.normal_(
                    model.tok_embeddings.weight[:, old_hidden:], 0.0, grown_cfg.init_std, generator=generator
                )
                masks.mask_output(model.tok_embeddings, new_dims)
            for block in model.layers.values():
                for linear in (block.attention.wo, block.feed_forward.w2):
                    nn.init.normal_(linear.weight[old_hidden:], 0.0, write_std, generator=generator)
                    masks.mask_output(linear, new_dims)
    if target.layers != model.cfg.layers:
        old_blocks = {id(block) for block in model.layers.values()}
        record(grow_depth(model, target.layers, request.layer_position, "random", False, generator))
        for block in model.layers.values():
            if id(block) not in old_blocks:
                masks.mask_output(block.attention.wo)
                masks.mask_output(block.feed_forward.w2)
    assert math.isclose(masks.value, 0.0)
    return masks, all_changes
