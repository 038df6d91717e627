"""Run under ``torchrun --nproc-per-node 2``: the real :class:`~sapwood.train.loop.Trainer` with
``parallel.pp=2`` trains the same tiny model twice, in fp32 and in fp16 (GradScaler), and rank 0 writes
both runs' logged ``train`` events to ``OUT/pp_fp32.json`` and ``OUT/pp_fp16.json``.

    torchrun --standalone --nproc-per-node 2 tests/train_workers/pipeline_fp16.py TOKENS_DIR OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sapwood.config import Config, validate
from sapwood.train.loop import Trainer
from sapwood.train.mesh import shutdown_distributed
from sapwood.train.metrics import read_events

MODEL = {
    "vocab_size": 320, "hidden": 64, "layers": 4, "heads": 4, "kv_heads": 2, "ffn": 128,
    "trained_context": 32,
}


def run(tokens: Path, out: Path, precision: str) -> dict:
    config = validate(
        Config,
        {
            "model": MODEL,
            "train": {
                "steps": 3, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                "eval_every": 3, "eval_batches": 1, "save_every": 1000, "log_every": 1, "device": "cpu",
                "precision": precision, "grad_clip": 1.0, "out_dir": str(out / precision), "progress": False,
            },
            "data": {"path": str(tokens)},
            "parallel": {"pp": 2, "pp_microbatches": 2},
        },
    )
    trainer = Trainer(config)
    summary = trainer.fit()
    return {"train": read_events(out / precision / "metrics.jsonl", "train") if trainer.rank == 0 else [],
            "val_loss": summary.get("val_loss"), "pipelined": trainer.parallel.pipelined}


def main() -> None:
    tokens, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    results = {precision: run(tokens, out, precision) for precision in ("fp32", "fp16")}
    if torch.distributed.get_rank() == 0:
        for precision, result in results.items():
            (out / f"pp_{precision}.json").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
