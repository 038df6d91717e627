"""Loss parity of the memory-lean training options against plain AdamW (fp32) on the CPU.

    OMP_NUM_THREADS=1 python scripts/memory_parity.py --steps 300 --out /tmp/parity

Trains the same small language model (stdlib tokens) once per option and prints, per option, the
mean training loss of the last 20 steps and its relative gap to plain AdamW, as one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from sapwood.config import Config, validate
from sapwood.data.text import stdlib_corpus, tokenize_corpus
from sapwood.train.loop import Trainer
from sapwood.train.metrics import read_events

MODEL = {
    "vocab_size": 320, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128,
    "trained_context": 32,
}
OPTIONS = {
    "adamw": {}, "adamw8bit": {"optimizer": "adamw8bit"}, "bf16-pure": {"precision": "bf16-pure"},
    "bf16-pure+adamw8bit": {"precision": "bf16-pure", "optimizer": "adamw8bit"},
    "optimizer_in_backward": {"optimizer_in_backward": True, "grad_clip": None},
    "loss_chunk=64": {"loss_chunk": 64},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokens = args.out / "tokens"
    if not tokens.exists():
        tokenize_corpus(stdlib_corpus(max_files=30), tokens, vocab_size=320, val_fraction=0.15)
    tails = {}
    for name, options in OPTIONS.items():
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        train = {
            "steps": args.steps, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 10,
            "eval_every": 10**6, "save_every": 10**6, "log_every": 1, "device": "cpu", "out_dir": str(out),
            "progress": False, **options,
        }
        Trainer(validate(Config, {"model": dict(MODEL), "train": train, "data": {"path": str(tokens)}})).fit()
        losses = [r["loss"] for r in read_events(out / "metrics.jsonl", "train")]
        tails[name] = sum(losses[-20:]) / 20
        gap = (tails[name] - tails["adamw"]) / tails["adamw"]
        print(
            json.dumps(
                {
                    "option": name, "steps": args.steps, "first_loss": round(losses[0], 4),
                    "last20_mean_loss": round(tails[name], 4), "gap_vs_adamw": round(gap, 4),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
