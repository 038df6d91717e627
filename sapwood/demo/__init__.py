"""`sapwood demo` / `make demo`: the whole pipeline on embedded defaults, on a CPU, in minutes.

Each stage is one function; the cube and surrogate stages live in this package (cubes.py, surrogate.py), the
others in the modules they show. This file only orders them.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

console = Console()


def run_demo(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from sapwood.demo.cubes import cube_stage
    from sapwood.demo.surrogate import surrogate_stage
    from sapwood.serve.demo import generation_and_serving_stage
    from sapwood.sizing import demo_stage as sizing_stage
    from sapwood.train.demo import language_model_stage

    stages = [  # (title, callable(out_dir)) in pipeline order; each area adds its stage here
        ("sizing: every preset, then the tiny model created and run", sizing_stage),
        ("language model: tokenize the stdlib, train the tiny preset, evaluate (DEMO/lm/final)", language_model_stage),
        ("generation and serving: samples, then the OpenAI-compatible server and one request", generation_and_serving_stage),
        ("cubes: simulate planets -> prepare a store -> load and augment batches", cube_stage),
        ("surrogate: train a tiny cube surrogate, skill and physics on held-out planets", surrogate_stage),
    ]
    for title, stage in stages:
        console.rule(title)
        stage(out)
