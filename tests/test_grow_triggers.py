"""Triggers fire on synthetic loss curves exactly when specified: schedule, plateau, grad norm, spike guard,
cooldown, max events, and their state survives a checkpoint."""

from __future__ import annotations

from sapwood.config import GrowthConfig
from sapwood.grow.triggers import GrowthTriggers


def run(
    config: GrowthConfig, losses: list[float], grad_norms: list[float] | None = None,
    tokens_per_step: int = 100,
) -> list[tuple[int, str]]:
    """Feed a curve (step k+1 gets losses[k]); every fired trigger is treated as a growth event."""
    triggers = GrowthTriggers(config)
    fired = []
    for index, loss in enumerate(losses):
        step = index + 1
        grad = grad_norms[index] if grad_norms else None
        name = triggers.observe(step, loss, grad, tokens=step * tokens_per_step)
        if name is not None:
            triggers.record_event(step)
            fired.append((step, name))
    return fired


def decaying(steps: int, start: float = 5.0, rate: float = 0.9) -> list[float]:
    return [start * rate**k + 1.0 for k in range(steps)]


def test_schedule_by_steps_and_tokens():
    config = GrowthConfig(at_steps=[5, 12], at_tokens=[2000], max_events=5)
    assert run(config, decaying(30)) == [
        (5, "schedule_steps"),
        (12, "schedule_steps"),
        (20, "schedule_tokens"),
    ]


def test_plateau_fires_when_improvement_drops_below_threshold():
    # falls 10% per step for 10 steps, then flat: window means improve 2.7% at step 16, 0% at step 17
    losses = [10 * 0.9**k for k in range(10)] + [10 * 0.9**9] * 20
    config = GrowthConfig(plateau={"window": 4, "min_rel_improvement": 0.01})
    assert run(config, losses) == [(17, "plateau")]


def test_plateau_never_fires_while_improving():
    config = GrowthConfig(plateau={"window": 3, "min_rel_improvement": 0.01}, max_events=3)
    assert run(config, [10 * 0.95**k for k in range(60)]) == []


def test_grad_norm_trigger():
    grads = [1.0] * 10 + [0.05] * 10
    config = GrowthConfig(grad_norm={"window": 3, "below": 0.1})
    assert run(config, [3.0] * 20, grads) == [(13, "grad_norm")]


def test_spike_guard_defers_a_scheduled_event():
    losses = [3.0] * 10
    losses[5] = 9.0  # step 6 spikes: the event due at step 6 waits until step 7
    config = GrowthConfig(at_steps=[6], spike_guard={"window": 4, "factor": 1.5})
    assert run(config, losses) == [(7, "schedule_steps")]
    losses[6] = 8.0  # still spiking at step 7 (8 > 1.5 x median 3): waits until step 8
    assert run(config, losses) == [(8, "schedule_steps")]


def test_cooldown_and_max_events():
    flat = [2.0] * 40
    config = GrowthConfig(plateau={"window": 2, "min_rel_improvement": 0.01}, cooldown_steps=10, max_events=3)
    # first plateau after 2 windows (step 4); then at least 10 steps apart and 4 new losses each time
    assert run(config, flat) == [(4, "plateau"), (14, "plateau"), (24, "plateau")]
    config = GrowthConfig(at_steps=[3, 5, 30], cooldown_steps=5, max_events=2)
    assert run(config, flat) == [(3, "schedule_steps"), (8, "schedule_steps")]


def test_min_step_and_exhausted():
    config = GrowthConfig(plateau={"window": 2, "min_rel_improvement": 0.01}, min_step=10, max_events=2)
    triggers = GrowthTriggers(config)
    fired = [s for s in range(1, 15) if triggers.observe(s, 2.0)]
    assert fired[0] == 10
    triggers.exhausted = True
    assert triggers.observe(15, 2.0) is None and triggers.blocked_reason == "caps reached"


def test_state_round_trip_gives_the_same_future():
    config = GrowthConfig(
        plateau={"window": 3, "min_rel_improvement": 0.02}, spike_guard={"window": 5}, cooldown_steps=4,
        max_events=4,
    )
    losses = [4.0 - 0.01 * k for k in range(40)]
    a = GrowthTriggers(config)
    for step in range(1, 11):
        if a.observe(step, losses[step - 1]):
            a.record_event(step)
    b = GrowthTriggers(config)
    b.load_state_dict(a.state_dict())
    out_a, out_b = [], []
    for step in range(11, 41):
        for triggers, out in ((a, out_a), (b, out_b)):
            if triggers.observe(step, losses[step - 1]):
                triggers.record_event(step)
                out.append(step)
    assert out_a == out_b and out_a
