"""The optimizer of a training run, from ``train.optimizer``, ``train.precision`` and
``train.optimizer_in_backward``.

=================  =========================================================================
``adamw``          ``torch.optim.AdamW`` (fused on CPU and CUDA), fp32 moments
``adamw8bit``      torchao's ``AdamW8bit``: both moments blockwise-quantized to 8 bit (blocks of
                   256 values, one scale each; tensors under 4,096 values stay fp32, as
                   bitsandbytes does), the update computed in fp32
``adamw4bit``      torchao's ``AdamW4bit`` (blocks of 128)
=================  =========================================================================

torchao rather than bitsandbytes: its low-bit states are tensor subclasses written in plain torch
ops, so they run on the CPU here (bitsandbytes' optimizers need its CUDA/native kernels), compose
with FSDP2's DTensor parameters, and on CUDA the step is ``torch.compile``d into fused kernels. On the
CPU the step runs eagerly: compiling it costs minutes of C++ compilation for a step that takes
milliseconds at the shapes trained on a CPU.

``precision: bf16-pure`` keeps parameters and gradients in bf16 (no fp32 master copy): the AdamW
update is computed in fp32 and written back with stochastic rounding (torchao's
``bf16_stochastic_round``), so updates smaller than bf16's spacing still move the weight in
expectation instead of being rounded away.

``optimizer_in_backward: true`` gives every parameter its own optimizer, stepped by a
post-accumulate-grad hook as soon as that parameter's gradient is complete on the last micro-batch;
the gradient is then freed, so no full set of gradients is alive at once. Global-norm clipping needs
every gradient at once, so it cannot be combined (``grad_clip: null``), nor can fp16 loss scaling.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from sapwood.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not norms or biases)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _torchao_class(name: str, pure_bf16: bool) -> type:
    try:
        from torchao.optim import AdamW4bit, AdamW8bit, _AdamW
    except ImportError as exc:  # pragma: no cover - torchao is a dependency
        raise ConfigError(f"train.optimizer={name!r} needs torchao ({exc}); pip install torchao") from None
    if name == "adamw8bit":
        return AdamW8bit
    if name == "adamw4bit":
        return AdamW4bit
    assert pure_bf16
    return _AdamW


@functools.cache
def eager_on_cpu(cls: type) -> type:
    """``cls`` (a torchao optimizer) whose ``step`` runs eagerly (``torch.compile`` stance ``force_eager``)
    unless its parameters are on a GPU."""

    class Optimizer(cls):
        def step(self, closure=None):
            on_gpu = any(p.is_cuda for group in self.param_groups for p in group["params"])
            if on_gpu:
                return super().step(closure)
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    Optimizer.__name__ = Optimizer.__qualname__ = cls.__name__
    return Optimizer


def make_optimizer(params: Iterable, name: str, precision: str, device: torch.device, lr: float,
                   betas: tuple[float, float]) -> torch.optim.Optimizer:
    """One optimizer over ``params`` (a list of tensors or of parameter groups)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer={name!r} is not supported; allowed: {', '.join(OPTIMIZERS)}")
    pure_bf16 = precision == "bf16-pure"
    if name == "adamw" and not pure_bf16:
        kwargs = {"lr": lr, "betas": betas}
        if device.type in ("cpu", "cuda"):
            try:
                return torch.optim.AdamW(params, fused=True, **kwargs)
            except (RuntimeError, TypeError):
                pass
        return torch.optim.AdamW(params, **kwargs)
    cls = _torchao_class(name, pure_bf16)
    # torchao wants a tensor learning rate (the scheduler then fills it in place).
    return eager_on_cpu(cls)(params, lr=torch.tensor(lr), betas=betas, bf16_stochastic_round=pure_bf16)


class OptimizerInBackward:
    """One optimizer per parameter, each stepped from that parameter's post-accumulate-grad hook.

    Looks like one optimizer to the loop: ``param_groups`` (every parameter's group, in order),
    ``zero_grad``, ``step`` (a no-op: the steps already happened in backward) and ``optimizers`` (the
    list ``torch.distributed.checkpoint.state_dict`` takes for saving and loading).
    """

    def __init__(self, model: nn.Module, name: str, precision: str, device: torch.device, lr: float,
                 betas: tuple[float, float], weight_decay: float):
        self.optimizers: list[torch.optim.Optimizer] = []
        self._armed = False
        self._handles = []
        for group in parameter_groups(model, weight_decay):
            for param in group["params"]:
                optimizer = make_optimizer([{"params": [param], "weight_decay": group["weight_decay"]}], name,
                                           precision, device, lr, betas)
                self.optimizers.append(optimizer)
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(optimizer)))

    def _hook(self, optimizer: torch.optim.Optimizer):
        def step_and_free(param: torch.Tensor) -> None:
            if self._armed:
                optimizer.step()
                param.grad = None

        return step_and_free

    @contextlib.contextmanager
    def stepping(self, armed: bool) -> Iterator[None]:
        """Within it, a backward steps every parameter whose gradient completes (the last micro-batch
        of an optimizer step); outside it gradients accumulate as usual."""
        previous, self._armed = self._armed, armed
        try:
            yield
        finally:
            self._armed = previous

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:
        """Nothing to do: every parameter stepped during backward."""

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class SchedulerGroup:
    """One LR scheduler per optimizer of an :class:`OptimizerInBackward`, stepped together."""

    def __init__(self, schedulers: list):
        self.schedulers = schedulers

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.schedulers[0].state_dict() if self.schedulers else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state)


def build_optimizer(
    model: nn.Module, train: Any, device: torch.device
) -> torch.optim.Optimizer | OptimizerInBackward:
    """The optimizer ``train`` (a :class:`~sapwood.config.TrainConfig`) asks for, over ``model``."""
    betas = (train.beta1, train.beta2)
    name = getattr(train, "optimizer", "adamw")
    if getattr(train, "optimizer_in_backward", False):
        return OptimizerInBackward(model, name, train.precision, device, train.lr, betas, train.weight_decay)
    return make_optimizer(
        parameter_groups(model, train.weight_decay), name, train.precision, device, train.lr, betas
    )


def check_memory_options(train: Any, world_size: int) -> None:
    """One-line :class:`ConfigError` for combinations the memory-lean options do not support."""
    if getattr(train, "optimizer_in_backward", False):
        if train.grad_clip is not None:
            raise ConfigError(
                f"train.optimizer_in_backward=true steps each parameter as its gradient completes, so "
                f"global-norm clipping (train.grad_clip={train.grad_clip}) is impossible; set grad_clip: null"
            )
        if train.precision == "fp16":
            raise ConfigError(
                "train.optimizer_in_backward=true cannot unscale fp16 gradients before the fused steps; "
                "use precision bf16 or bf16-pure"
            )
    if train.precision == "bf16-pure" and world_size > 1:
        raise ConfigError(
            "train.precision='bf16-pure' runs on one process for now (FSDP2 would need bf16 sharded "
            "parameters); use precision bf16 for a distributed run"
        )
    if getattr(train, "loss_chunk", None) is not None and world_size > 1:
        raise ConfigError(
            f"train.loss_chunk={train.loss_chunk} runs on one process (FSDP and tensor parallel shard "
            "the output head); set loss_chunk: null for a distributed run"
        )
