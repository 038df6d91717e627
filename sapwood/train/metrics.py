"""The JSONL event log of a run and the loss-curve plot drawn from it.

Every line is one JSON object with ``event`` (``train``, ``eval``, ``skip``, ``overflow``,
``checkpoint``, ``resume``, ``diverged``, ``done`` or any name a callback logs, e.g. ``growth``),
``step`` and its fields. After a resume, steps that were redone appear again; readers keep the last.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class EventLog:
    """Appends events to ``path`` (only on rank 0 of a distributed run); with ``tensorboard_dir``, also
    writes every numeric field of every event as a TensorBoard scalar ``EVENT/FIELD`` at its step."""

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(tensorboard_dir))

    def write(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "step": step, "time": round(time.time(), 3), **fields}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(strict_json(record) + "\n")
            if self.tensorboard is not None:
                for key, value in fields.items():
                    if (
                        isinstance(value, (int, float))
                        and not isinstance(value, bool)
                        and math.isfinite(value)
                    ):
                        self.tensorboard.add_scalar(f"{event}/{key}", value, step, walltime=record["time"])
                if event in ("eval", "checkpoint", "done"):
                    self.tensorboard.flush()
        return record

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def strict_json(value: Any) -> str:
    """``value`` as strict JSON (RFC 8259): NaN and infinities become ``null``, tensors and numpy
    scalars their Python value, anything else unknown its ``str``."""
    return json.dumps(finite_or_none(value), allow_nan=False)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively; other leaves made JSON-able."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return finite_or_none(value.item())
    if hasattr(value, "tolist"):
        return finite_or_none(value.tolist())
    return str(value)


def read_events(path: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if event is None or r["event"] == event]


def last_logged(path: str | Path) -> tuple[float, dict[str, float]]:
    """The last logged training loss (NaN when none) and the last evaluation's metrics of a run."""
    records = read_events(path)
    losses = [r["loss"] for r in records if r["event"] == "train" and isinstance(r.get("loss"), float)]
    evals = [r for r in records if r["event"] == "eval"]
    fields = {k: v for k, v in evals[-1].items() if k not in ("event", "step", "time")} if evals else {}
    return (losses[-1] if losses else float("nan")), fields


def last_per_step(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    """``{step: value}``, the last record for each step winning (redone steps after a resume)."""
    return {r["step"]: r[key] for r in records if key in r}


def plot_loss(metrics_path: str | Path, out_png: str | Path, baseline: float | None = None) -> Path:
    """Training and validation loss against step; growth events as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_events(metrics_path)
    train = last_per_step([r for r in records if r["event"] == "train"], "loss")
    val = last_per_step([r for r in records if r["event"] == "eval"], "val_loss")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps = sorted(train)
        values = [train[s] for s in steps]
        ax.plot(steps, values, color="tab:blue", alpha=0.35, lw=1, label="train loss")
        if len(values) >= 8:
            width = max(len(values) // 10, 2)
            smooth = [sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, color="tab:blue", lw=1.5, label=f"train loss (mean of {width} logs)")
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="validation loss")
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="gray", ls="--", label=f"unigram entropy {baseline:.2f}")
    for i, r in enumerate(r for r in records if r["event"] == "growth"):
        ax.axvline(r["step"], color="green", ls=":", label="growth" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
