"""`sapwood demo` / `make demo`: the whole pipeline on embedded defaults, on a CPU, in minutes.

Each stage is one function in a module of this package (sizing.py, lm.py, serving.py, sft.py, cubes.py,
surrogate.py). This file orders them, times them and owns the output folder: a rerun into the same folder
replaces what the stages it runs wrote before (the tokenized corpus is reused).
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from sapwood.errors import SapwoodError

console = Console()
MARKER = ".sapwood-demo"  # written into every demo folder, so a rerun knows the folder is its own


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # short: the section rule
    what: str  # one sentence under the rule
    function: str  # "module:function", called with the output folder
    folders: tuple[str, ...] = ()  # what the stage writes under the output folder (replaced on a rerun)


STAGES = [
    Stage(
        "sizing",
        "sizing",
        "Every preset sized without allocating weights: exact parameters, the training "
        "state on one device, and memory per GPU under the preset's own parallel plan; then the tiny model "
        "created, loaded back and run forward.",
        "sapwood.demo.sizing:sizing_stage",
        ("tiny",),
    ),
    Stage(
        "lm",
        "language model",
        "Tokenize standard-library Python files, train the tiny preset, evaluate it "
        "(checkpoint folder DEMO/lm/final).",
        "sapwood.demo.lm:language_model_stage",
        ("lm",),
    ),
    Stage(
        "serving",
        "generation and serving",
        "Samples from the trained model, then the OpenAI-compatible "
        "server and one request through the openai client.",
        "sapwood.demo.serving:generation_and_serving_stage",
    ),
    Stage(
        "sft",
        "fine-tuning",
        "Teach the language model generated questions (parity, last digit in words, larger unit), by full "
        "fine-tuning and with LoRA adapters: held-out exact match before and after against chance, "
        "training-state memory, both served by one server.",
        "sapwood.demo.sft:sft_stage",
        ("sft",),
    ),
    Stage(
        "cubes", "datacubes", "Simulate planets, prepare a store, load and augment batches.",
        "sapwood.demo.cubes:cube_stage", ("cubes",),
    ),
    Stage(
        "surrogate", "surrogate",
        "Train a tiny datacube surrogate, then its skill and physics on the held-out planets.",
        "sapwood.demo.surrogate:surrogate_stage", ("surrogate",),
    ),
]
REUSED = ("tokens",)  # kept across reruns: tokenizing is the same every time


def stages_named(names: list[str] | None) -> list[Stage]:
    """The stages to run, in pipeline order (all when ``names`` is empty)."""
    if not names:
        return list(STAGES)
    known = {stage.name for stage in STAGES}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SapwoodError(
            f"--only {','.join(unknown)}: unknown stage; stages: {', '.join(s.name for s in STAGES)}"
        )
    return [stage for stage in STAGES if stage.name in names]


def prepare_out(out: Path, stages: list[Stage]) -> str:
    """Make ``out`` ready for ``stages``; returns the sentence that says what happened to it.

    An empty or missing folder is used as is; a folder an earlier demo wrote is reused, the folders of the
    stages about to run replaced; any other non-empty folder is refused (nothing of the user's is deleted).
    """
    owned = {MARKER, *REUSED, *(name for stage in STAGES for name in stage.folders)}
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise SapwoodError(f"--out {out} is a file; choose a folder")
    if not entries:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("written by sapwood demo\n")
        return f"writing the demo into {out}"
    if MARKER not in entries and not set(entries) <= owned:
        raise SapwoodError(
            f"--out {out} is not empty and was not written by sapwood demo; choose another folder"
        )
    replaced = [name for stage in stages for name in stage.folders if (out / name).exists()]
    for name in replaced:
        shutil.rmtree(out / name)
    (out / MARKER).write_text("written by sapwood demo\n")
    kept = [name for name in REUSED if (out / name).exists()]
    said = f"{out} holds an earlier demo: reusing the folder"
    said += f", replacing {', '.join(replaced)}" if replaced else ""
    return said + (f", keeping {', '.join(kept)} (same input every run)" if kept else "")


class DemoInterrupted(SapwoodError):
    """Ctrl-C stopped the demo in ``stage``; the message names the command that reruns it and the rest."""


def run_demo(out: Path, only: list[str] | None = None) -> None:
    """Run ``only`` (default: every stage) into ``out``, each stage followed by its wall and CPU time.

    A Ctrl-C (a training stage stops after its current step) raises :class:`DemoInterrupted`."""
    import torch

    from sapwood.train.interrupt import TrainingInterrupted

    stages = stages_named(only)
    console.print(prepare_out(out, stages), highlight=False, soft_wrap=True)
    if not os.environ.get("OMP_NUM_THREADS"):  # the demo's models are tiny: a second thread costs more CPU
        torch.set_num_threads(1)  # than it saves (4x the CPU seconds per step on a busy 2-core machine)
    start, cpu_start = time.perf_counter(), time.process_time()
    for index, stage in enumerate(stages, 1):
        console.rule(f"[bold]{index}/{len(stages)} {stage.title}")
        console.print(stage.what, highlight=False)
        module, function = stage.function.split(":")
        stage_start, stage_cpu = time.perf_counter(), time.process_time()
        try:
            getattr(importlib.import_module(module), function)(out)
        except (KeyboardInterrupt, TrainingInterrupted) as exc:
            raise DemoInterrupted(interrupted_message(out, stages, index, exc)) from None
        console.print(
            f"[dim]{stage.name}: {time.perf_counter() - stage_start:.0f} s "
            f"(CPU {time.process_time() - stage_cpu:.0f} s)[/dim]",
            highlight=False,
        )
    console.rule()
    console.print(
        f"demo finished in {time.perf_counter() - start:.0f} s "
        f"(CPU {time.process_time() - cpu_start:.0f} s); everything it wrote is in {out}",
        highlight=False,
        soft_wrap=True,
    )


def interrupted_message(out: Path, stages: list[Stage], index: int, exc: BaseException) -> str:
    """``demo interrupted in stage 2/6 (language model) at training step 37; to continue: sapwood demo
    --out OUT --only lm,serving`` (the interrupted stage starts over: it replaces its folder)."""
    stage = stages[index - 1]
    step = getattr(exc, "step", None)
    where = f" at training step {step}" if step is not None else ""
    rest = ",".join(s.name for s in stages[index - 1 :])
    again = f"sapwood demo --out {out}" + (f" --only {rest}" if len(stages) - index + 1 < len(STAGES) else "")
    return (
        f"demo interrupted in stage {index}/{len(stages)} ({stage.title}){where}; to continue: {again} "
        f"(the {stage.name} stage starts over)"
    )
