"""Growth during training: the callback the trainer runs when the config has a ``growth:`` section.

After each optimizer step it feeds the step's loss, gradient norm and token count to the triggers; when
one fires it evaluates the validation loss, grows the model and the optimizer state in place
(``sapwood.grow.plan``), records the new shape in ``trainer.config.model`` (so the next checkpoint
rebuilds it), evaluates again and logs a ``growth`` event (step, trigger, shapes, parameter counts, loss
before / after) to the run's metrics JSONL and to ``growth.jsonl``.

``method: masked`` grows with :func:`sapwood.grow.masked.grow_model_masked`: the masks advance once per
optimizer step, are saved in the callback state (a run resumed mid-ramp reinstalls them) and, if the run
ends mid-ramp, are folded into the weights before ``final/`` is written. No event fires during a ramp.
Under FSDP2 both methods gather, grow and re-shard (``sapwood.grow.sharded``).
``rewarm_steps`` > 0 scales the schedule's LR by ``(k + 1) / rewarm_steps`` for the k-th step after an event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from sapwood.config import Config, GrowthConfig
from sapwood.grow.masked import GrowthMasks, grow_model_masked
from sapwood.grow.plan import (
    cap_violation,
    clip_to_caps,
    grow_model,
    params_of_shape,
    request_from_amounts,
    shape_of,
    target_config,
)
from sapwood.grow.triggers import GrowthTriggers
from sapwood.train.callbacks import Callback

console = Console()


def _eval_loss(metrics: dict[str, float]) -> float | None:
    for key in ("val_loss", "loss"):
        if key in metrics:
            return float(metrics[key])
    return next((float(v) for k, v in metrics.items() if "loss" in k), None)


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class GrowthCallback(Callback):
    """Grows ``trainer.model`` when the triggers of ``config`` fire."""

    def __init__(self, config: GrowthConfig, seed: int = 0, verbose: bool = True):
        self.config = config
        self.seed = seed
        self.verbose = verbose
        self.triggers = GrowthTriggers(config)
        self.tokens = 0
        self.history: list[dict[str, Any]] = []
        self.masks: GrowthMasks | None = None
        self._masked_model: torch.nn.Module | None = None
        self._saved_masks: dict[str, Any] | None = None  # from a checkpoint, installed at on_train_start

    @property
    def name(self) -> str:
        return "growth"

    def on_train_start(self, trainer: Any) -> None:
        if self._saved_masks is not None:
            self.masks = GrowthMasks.restore(trainer.model, self._saved_masks)
            self._masked_model, self._saved_masks = trainer.model, None
        self._rewarm(trainer)

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        self._rewarm(trainer)
        if metrics.get("skipped"):
            return
        if self.masks is not None:
            self.masks.step()
            if not self.masks.active:
                self.masks = self._masked_model = None
        self.tokens += int(metrics.get("units", 0))
        if self.masks is not None:
            return  # no event while the last one's masks still ramp
        fired = self.triggers.observe(step, float(metrics["loss"]), metrics.get("grad_norm"), self.tokens)
        if fired is not None:
            self.grow(trainer, step, fired, float(metrics["loss"]))

    def grow(self, trainer: Any, step: int, trigger: str, train_loss: float) -> dict[str, Any] | None:
        """Grow now (the triggers said so); returns the logged event, or None when the caps forbid it."""
        cfg = trainer.config.model
        request = clip_to_caps(cfg, request_from_amounts(cfg, self.config.add), self.config.caps)
        target = target_config(cfg, request)
        problem = cap_violation(target, self.config.caps)
        if target == cfg or problem is not None:
            self.triggers.exhausted = True
            trainer.log_event(
                "growth_skipped", trigger=trigger, reason=problem or "caps reached: nothing to add"
            )
            return None
        loss_before = _eval_loss(trainer.evaluate())
        device = next(trainer.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)
        if self.config.method == "masked" and _is_sharded(trainer.model):
            from sapwood.grow.sharded import grow_sharded_masked

            trainer.model, self.masks = grow_sharded_masked(
                trainer.model, trainer.optimizer, request, self.config.mask_ramp_steps, generator,
                shard_fn=getattr(trainer, "shard_model", None),
            )
            self._masked_model = trainer.model
        elif self.config.method == "masked":
            self.masks, _ = grow_model_masked(
                trainer.model, request, self.config.mask_ramp_steps, trainer.optimizer, generator
            )
            self._masked_model = trainer.model
        elif _is_sharded(trainer.model):
            from sapwood.grow.sharded import grow_sharded

            trainer.model = grow_sharded(
                trainer.model, trainer.optimizer, request, generator,
                shard_fn=getattr(trainer, "shard_model", None),
            )
        else:
            grow_model(trainer.model, request, trainer.optimizer, generator=generator)
        trainer.config.model = target
        trainer.model_changed()
        loss_after = _eval_loss(trainer.evaluate())
        event = {
            "trigger": trigger, "train_loss": train_loss, "loss_before": loss_before,
            "loss_after": loss_after, "shape_before": shape_of(cfg), "shape_after": shape_of(target),
            "params_before": params_of_shape(cfg), "params_after": params_of_shape(target),
            "tokens": self.tokens,
        }
        trainer.log_event("growth", **event)
        self._append_log(trainer, step, event)
        self.triggers.record_event(step)
        self.history.append({"step": step, **event})
        self._rewarm(trainer)
        if self.verbose and getattr(trainer, "rank", 0) == 0:
            console.print(
                f"[green]growth[/green] at step {step} ({trigger}): {event['params_before']:,} -> "
                f"{event['params_after']:,} params; val loss before {loss_before:.6f}, after {loss_after:.6f}"
            )
        return event

    def on_train_end(self, trainer: Any) -> None:
        if self.masks is not None:
            value = self.masks.value
            self.masks.fold(trainer.model)
            self.masks = self._masked_model = None
            trainer.log_event("growth_masks_folded", mask=value)

    def _rewarm(self, trainer: Any) -> None:
        """Scale the LR of the next step when it is within ``rewarm_steps`` of the last event."""
        n, last = self.config.rewarm_steps, self.triggers.last_event_step
        if not n or last is None or trainer.step - last > n:
            return
        factor = min(1.0, (trainer.step - last + 1) / n)
        for scheduler in getattr(trainer.scheduler, "schedulers", [trainer.scheduler]):
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr * factor

    def _append_log(self, trainer: Any, step: int, event: dict[str, Any]) -> None:
        if getattr(trainer, "rank", 0) != 0:
            return
        path = Path(trainer.out_dir) / self.config.log_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"event": "growth", "step": step, **event}) + "\n")

    def state_dict(self) -> dict[str, Any]:
        masks = self.masks.state_dict(self._masked_model) if self.masks is not None else None
        return {
            "triggers": self.triggers.state_dict(), "tokens": self.tokens,
            "history": json.dumps(self.history), "masks": json.dumps(masks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.triggers.load_state_dict(state.get("triggers", {}))
        self.tokens = int(state.get("tokens", 0))
        self.history = json.loads(state.get("history", "[]"))
        self._saved_masks = json.loads(state.get("masks", "null"))


def growth_callbacks(config: Config) -> list[Callback]:
    """The callbacks for ``config.growth`` (registered in ``sapwood.train.callbacks.CALLBACK_BUILDERS``)."""
    if config.growth is None:
        return []
    seed = config.train.seed if config.train is not None else 0
    return [GrowthCallback(config.growth, seed=seed)]
