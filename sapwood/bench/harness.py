"""The shared benchmark harness: timing with warm-up and repeats, results, JSON and PNG output.

Every suite module (``sapwood.bench.<suite>``) builds a list of :class:`Result` and calls
:func:`write_suite`. ``ratio`` is oriented so that > 1 always means sapwood is better: ours/baseline
for rates (tokens/s, GB/s), baseline/ours for durations (s, ms, bytes of memory).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

LOWER_IS_BETTER_UNITS = {
    "s", "ms", "us", "s/batch", "ms/token", "bytes", "MB", "GB", "MiB", "GiB", "FLOPs", "%", "ppl", "nats",
}


@dataclass
class Timing:
    """Seconds per call over ``repeats`` timed calls after ``warmup`` untimed ones."""

    median: float
    minimum: float
    maximum: float
    stdev: float
    samples: list[float]


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5, device: str | None = None) -> Timing:
    """Time ``fn`` (synchronizing the GPU around each call when one is used)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return Timing(
        median=statistics.median(samples), minimum=min(samples), maximum=max(samples),
        stdev=statistics.stdev(samples) if len(samples) > 1 else 0.0, samples=samples,
    )


@dataclass
class Result:
    name: str
    value: float
    unit: str
    baseline_value: float
    ratio: float = field(init=False)
    params: dict[str, Any] = field(default_factory=dict)
    baseline: str = "baseline"

    def __post_init__(self) -> None:
        if self.unit in LOWER_IS_BETTER_UNITS:
            self.ratio = self.baseline_value / self.value if self.value else float("inf")
        else:
            self.ratio = self.value / self.baseline_value if self.baseline_value else float("inf")


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_suite(
    suite: str, results: list[Result], out_dir: str | Path, plot: Callable[[Any], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``OUT/SUITE.json`` and ``OUT/SUITE.png``; return the JSON path.

    ``plot`` receives a matplotlib Axes; without it, a bar chart of ours vs baseline per result.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"suite": suite, "device": device_description(), "results": [asdict(r) for r in results]}
    if extra:
        payload["extra"] = extra
    json_path = out / f"{suite}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=float))
    _plot(suite, results, out / f"{suite}.png", plot)
    return json_path


def _plot(suite: str, results: list[Result], path: Path, plot: Callable[[Any], None] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if plot is not None:
        plot(ax)
    else:
        names = [r.name for r in results]
        xs = range(len(results))
        ax.bar([x - 0.2 for x in xs], [r.value for r in results], width=0.4, label="sapwood")
        ax.bar([x + 0.2 for x in xs], [r.baseline_value for r in results], width=0.4, label="baseline")
        ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
        units = sorted({r.unit for r in results})
        ax.set_ylabel(", ".join(units))
        ax.legend()
    ax.set_title(f"sapwood bench {suite}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_results(results: list[Result]) -> None:
    """A rich table of the results (ours, baseline, ratio)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "sapwood", "baseline", "unit", "ratio (>1 = sapwood better)")
    for r in results:
        table.add_row(r.name, f"{r.value:.4g}", f"{r.baseline_value:.4g}", r.unit, f"{r.ratio:.2f}x")
    Console().print(table)
