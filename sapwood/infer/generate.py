"""``sapwood generate``: text from a checkpoint folder through the engine (several samples run batched)."""

from __future__ import annotations

from pathlib import Path

from sapwood.infer.engine import Engine
from sapwood.infer.sampling import SamplingParams


def generate_samples(
    folder: str | Path | Engine, prompt: str, params: SamplingParams, samples: int = 1
) -> list[str]:
    """``samples`` continuations of ``prompt``; sample ``i`` uses seed ``params.seed + i`` when seeded."""
    engine = folder if isinstance(folder, Engine) else Engine.from_folder(folder)
    prompt_ids = engine.tokenizer.encode(prompt)
    per_sample = []
    for i in range(samples):
        seed = None if params.seed is None else params.seed + i
        per_sample.append(SamplingParams(**{**params.__dict__, "seed": seed}))
    requests = engine.generate([prompt_ids] * samples, per_sample)
    return [r.stream.text for r in requests]
