"""Callbacks: code that runs inside the training loop without the loop knowing what it does.

The loop calls ``on_train_start(trainer)`` once (after a resume has been applied),
``on_step_end(trainer, step, metrics)`` after every optimizer step (``step`` is the number of
completed steps, ``metrics`` the step's logged fields), and ``on_train_end(trainer)``.

A callback may replace the model's parameters and edit the optimizer in place (swap tensors in
``trainer.optimizer.param_groups`` and ``trainer.optimizer.state``; the scheduler keeps working
because it only scales the groups' ``lr``), and set ``trainer.config.model`` to the new shape; it
then calls ``trainer.model_changed()`` so activation checkpointing covers new blocks. The next
checkpoint stores the current config, so resume rebuilds the grown shape before loading states.
``state_dict()`` / ``load_state_dict()`` (plain Python values and tensors) are saved in every
checkpoint under the callback's ``name``. Events go to the run's JSONL log via ``trainer.log_event``.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Base class with no-op hooks; subclass and override what you need."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def on_train_start(self, trainer: Any) -> None:
        pass

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# Config section name -> "module:function"; the function takes the root config and returns a list of
# callbacks. ``callbacks_from_config`` imports only the builders whose section is set, so the training
# package never imports e.g. ``sapwood.grow`` statically. Owners add one line here.
CALLBACK_BUILDERS: dict[str, str] = {
    "growth": "sapwood.grow.callback:growth_callbacks",
    "context": "sapwood.train.context_extension:context_callbacks",
}


def callbacks_from_config(config: Any) -> list[Callback]:
    """The callbacks that the config's optional sections ask for (e.g. ``growth:``)."""
    import importlib

    callbacks: list[Callback] = []
    for section, target in CALLBACK_BUILDERS.items():
        if getattr(config, section, None) is None:
            continue
        module_name, function_name = target.split(":", 1)
        builder = getattr(importlib.import_module(module_name), function_name)
        callbacks.extend(builder(config))
    return callbacks
