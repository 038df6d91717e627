"""When to grow: schedule (steps / tokens), loss plateau, small gradient norm; blocked by a loss spike,
a cooldown after the last event, ``min_step`` and ``max_events``.

Pure bookkeeping on the numbers the loop logs: :meth:`GrowthTriggers.observe` is called once per
optimizer step and returns the name of the trigger that fires (or None). Its state is plain Python, so it
is saved in training checkpoints and a resumed run fires at the same steps.
"""

from __future__ import annotations

import statistics
from typing import Any

from sapwood.config import GrowthConfig


class GrowthTriggers:
    def __init__(self, config: GrowthConfig):
        self.config = config
        self.losses: list[float] = []  # since the last event (plateau)
        self.grad_norms: list[float] = []  # since the last event
        self.recent_losses: list[float] = []  # spike guard history, kept across events
        self.events = 0
        self.last_event_step: int | None = None
        self.steps_done: list[int] = []  # schedule entries already used
        self.tokens_done: list[int] = []
        self.blocked_reason: str | None = None
        self.exhausted = False  # caps reached: no further event

    # ------------------------------------------------------------------ observation

    def observe(
        self, step: int, loss: float, grad_norm: float | None = None, tokens: int | None = None
    ) -> str | None:
        """Record step ``step``'s numbers; the trigger that fires now, or None."""
        spike = self._is_spike(loss)
        self.recent_losses.append(loss)
        guard = self.config.spike_guard
        if guard is not None:
            self.recent_losses = self.recent_losses[-guard.window :]
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        self._trim()
        self.blocked_reason = self._blocked(step, spike)
        if self.blocked_reason is not None:
            return None
        return self._fired(step, tokens)

    def _is_spike(self, loss: float) -> bool:
        guard = self.config.spike_guard
        if guard is None or len(self.recent_losses) < guard.window:
            return False
        return loss > guard.factor * statistics.median(self.recent_losses[-guard.window :])

    def _trim(self) -> None:
        plateau, grad = self.config.plateau, self.config.grad_norm
        keep_losses = 2 * plateau.window if plateau else 1
        self.losses = self.losses[-keep_losses:]
        self.grad_norms = self.grad_norms[-(grad.window if grad else 1) :]

    def _blocked(self, step: int, spike: bool) -> str | None:
        if self.exhausted:
            return "caps reached"
        if self.events >= self.config.max_events:
            return f"max_events={self.config.max_events} reached"
        if step < self.config.min_step:
            return f"before min_step={self.config.min_step}"
        if self.last_event_step is not None and step - self.last_event_step < self.config.cooldown_steps:
            return (
                f"cooldown of {self.config.cooldown_steps} steps after the event at step "
                f"{self.last_event_step}"
            )
        if spike:
            return "loss spike"
        return None

    def _fired(self, step: int, tokens: int | None) -> str | None:
        config = self.config
        due_steps = [s for s in config.at_steps if s <= step and s not in self.steps_done]
        if due_steps:
            self.steps_done.extend(due_steps)
            return "schedule_steps"
        if tokens is not None:
            due_tokens = [t for t in config.at_tokens if t <= tokens and t not in self.tokens_done]
            if due_tokens:
                self.tokens_done.extend(due_tokens)
                return "schedule_tokens"
        plateau = config.plateau
        if plateau is not None and len(self.losses) >= 2 * plateau.window:
            previous = statistics.fmean(self.losses[: plateau.window])
            current = statistics.fmean(self.losses[plateau.window :])
            if (previous - current) / abs(previous) < plateau.min_rel_improvement:
                return "plateau"
        grad = config.grad_norm
        if (
            grad is not None
            and len(self.grad_norms) >= grad.window
            and statistics.fmean(self.grad_norms) < grad.below
        ):
            return "grad_norm"
        return None

    def record_event(self, step: int) -> None:
        """A growth event happened at ``step``: count it and restart the plateau / grad-norm windows."""
        self.events += 1
        self.last_event_step = step
        self.losses.clear()
        self.grad_norms.clear()

    # ------------------------------------------------------------------ checkpointing

    _STATE = (
        "losses", "grad_norms", "recent_losses", "events", "last_event_step", "steps_done", "tokens_done",
        "exhausted",
    )

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._STATE:
            if name in state:
                value = state[name]
                setattr(self, name, list(value) if isinstance(value, list) else value)
