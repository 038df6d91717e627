"""The task abstraction: what the training loop needs to train one kind of model on one kind of data.

The same :class:`sapwood.train.loop.Trainer` trains the language model (``text``) and the datacube
surrogate: a task is picked by ``train.task`` in the config, either a registered name from
:data:`TASKS` or ``"package.module:ClassName"``. A task class is constructed as ``Task(config)``
(the validated root :class:`sapwood.config.Config`) and provides:

``build_model(config) -> nn.Module``
    Called under ``torch.device("meta")``; the loop applies parallelism, materializes with
    ``to_empty`` and then calls ``model.init_weights()``. ``config.model`` is the *current* shape
    (after growth, or as stored in a checkpoint being resumed).
``train_batches(micro_batch_size, rank, world_size) -> Batches``
    An endless iterator of micro-batches (tensors, tuples or dicts of tensors, on CPU; the loop
    moves them) with ``state_dict()`` / ``load_state_dict()`` so resume continues exactly.
``loss(model, batch) -> (loss, metrics)``
    A scalar loss (the loop computes it under autocast; compute the loss itself in float32) and
    a dict of float metrics for this micro-batch.
``evaluate(model, micro_batch_size, batches) -> metrics``
    ``batches`` micro-batches, the same ones every call. Called under ``torch.no_grad()``, autocast
    and ``model.eval()``; returns floats such as
    ``val_loss``. Keys are logged as they are.
``count_units(batch) -> int``
    Units of work in a batch for throughput (tokens for text); logged as ``units_per_s``.
``tokenizer_file() -> Path | None``
    Copied into the final checkpoint folder.

A task whose loss is a function of the model's output alone (:class:`PipelinedTask`) can also train
under pipeline parallelism (``parallel.pp > 1``), where the last stage computes the loss:

``split_batch(batch) -> (inputs, targets)``
    The model's input tensor and what the loss compares its output with.
``output_loss(output, targets) -> loss``
    The same loss :meth:`loss` computes, from the model's output.

``evaluate`` receives the trainer's :class:`~sapwood.train.parallel.ParallelModel`: call it like the
model (``model(inputs)``; under pipeline parallelism the whole pipeline's forward), and use
``parameters()`` and ``get_buffer(name)`` as on a module.
``save_final(model, config, folder)`` (optional)
    Writes the final folder's files into ``folder`` (a staging folder published atomically) instead of the
    default checkpoint folder; ``model`` is the plain model built by ``build_model`` with the trained weights.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from sapwood.errors import ConfigError

TASKS: dict[str, str] = {
    "text": "sapwood.train.text_task:TextTask", "cube": "sapwood.train.cube_task:CubeTask",
    "passkey": "sapwood.train.passkey_task:PasskeyTask", "sft": "sapwood.train.sft:SFTTask",
}


@runtime_checkable
class Batches(Protocol):
    def __iter__(self) -> Any: ...
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(Protocol):
    def build_model(self, config: Any) -> nn.Module: ...
    def train_batches(self, micro_batch_size: int, rank: int, world_size: int) -> Batches: ...
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...
    def evaluate(self, model: nn.Module, micro_batch_size: int, batches: int) -> dict[str, float]: ...
    def count_units(self, batch: Any) -> int: ...
    def tokenizer_file(self) -> Path | None: ...


@runtime_checkable
class PipelinedTask(Protocol):
    """The two methods a task needs for pipeline parallelism (see the module docstring)."""

    def split_batch(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]: ...
    def output_loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


def register_task(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (usable as ``train.task: name``)."""
    TASKS[name] = target


def task_class(name: str) -> type:
    target = TASKS.get(name, name)
    if ":" not in target:
        raise ConfigError(
            f"train.task={name!r} is unknown; registered tasks: {', '.join(sorted(TASKS))} (or "
            f"'module:Class')"
        )
    module_name, class_name = target.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"train.task={name!r}: cannot import {target} ({exc})") from None


def build_task(config: Any) -> Task:
    """The task object for ``config.train.task``."""
    return task_class(config.train.task)(config)
