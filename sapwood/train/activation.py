"""Activation checkpointing applied from outside the model code.

Each chosen transformer block (every entry of the model's ``layers`` ModuleDict) gets an instance
``forward`` that runs the block's own forward under ``torch.utils.checkpoint`` (non-reentrant):
its inner activations are dropped after the forward and recomputed in the backward. Parameter names,
state dicts and hooks are unchanged, so checkpoints, FSDP2 and growth surgery see the same model.

Modes: ``none``; ``every_layer`` (every block, the most memory saved); ``every_k`` (blocks whose
index is a multiple of ``k``: 0, k, 2k, ... trading memory for speed, as torchtitan's selective
layer option). :func:`apply_activation_checkpointing` is idempotent: call it again after growth
adds blocks.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MARK = "_sapwood_activation_checkpointed"


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{index: block}`` of the model's ``layers`` ModuleDict."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleDict of transformer blocks")
    return dict(layers.items())


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = type(block).forward
    if not torch.is_grad_enabled():
        return forward(block, *args, **kwargs)
    return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)


def checkpoint_block(block: nn.Module) -> None:
    block.forward = functools.partial(_checkpointed_forward, block)
    setattr(block, MARK, True)


def apply_activation_checkpointing(model: nn.Module, mode: str, every_k: int = 2) -> list[str]:
    """Checkpoint the blocks chosen by ``mode``; return the names of all checkpointed blocks."""
    if mode == "none":
        return []
    for name, block in transformer_blocks(model).items():
        chosen = mode == "every_layer" or (mode == "every_k" and int(name) % every_k == 0)
        if chosen and not getattr(block, MARK, False):
            checkpoint_block(block)
    return checkpointed_block_names(model)


def checkpointed_block_names(model: nn.Module) -> list[str]:
    return [name for name, block in transformer_blocks(model).items() if getattr(block, MARK, False)]
