"""Mixed precision: autocast for matmuls, fp32 master weights, and a gradient scaler for fp16.

Parameters and optimizer state stay float32; ``autocast`` runs matmuls in bf16/fp16. RMSNorm is
computed in float32 inside the model and tasks compute their loss on ``logits.float()``.
fp16 uses ``torch.amp.GradScaler``: an overflowing step is skipped and the scale halves.

``bf16-pure`` is the memory-lean mode: parameters (and so gradients) are bf16 themselves, no autocast
is needed, and the optimizer writes its fp32 update back with stochastic rounding
(:mod:`sapwood.train.optim`). :func:`cast_parameters` casts a built model's parameters (not its
buffers: rotary frequencies stay fp32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16-pure": torch.bfloat16}


class Precision:
    def __init__(self, name: str, device_type: str):
        self.name = name
        self.dtype = DTYPES[name]
        self.device_type = device_type

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.name in ("fp32", "bf16-pure"):
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def grad_scaler(self, distributed: bool = False) -> torch.amp.GradScaler:
        """Enabled only for fp16 (bf16 has fp32's exponent range and needs no scaling). ``distributed``:
        a :class:`DistributedGradScaler`, so every rank skips the same steps and keeps the same scale."""
        cls = DistributedGradScaler if distributed else torch.amp.GradScaler
        return cls(self.device_type, enabled=self.name == "fp16")


class DistributedGradScaler(torch.amp.GradScaler):
    """A GradScaler whose "found inf" is the maximum over all ranks: each rank holds other gradient
    shards or pipeline stages, so an overflow on one must skip the step (and halve the scale) on all.

    FSDP2's ``ShardedGradScaler`` does the same reduction but leaves ``found_inf`` with shape ``[1]``,
    which the fused AdamW step rejects (it expects a scalar); this one keeps torch's shapes."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self._enabled or not torch.distributed.is_initialized():
            return
        for found_inf in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating-point parameter of ``model`` to ``dtype`` in place (buffers untouched)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
