"""The demo's language-model stage: tokenize a bounded stdlib subset, train the tiny preset, evaluate.

Writes ``DEMO/tokens`` (tokenizer and shards) and ``DEMO/lm`` (checkpoints, metrics.jsonl, loss.png)
with the final checkpoint folder at ``DEMO/lm/final`` for the generation and serving stages.
The training config is ``sapwood/demo/lm.yaml``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from sapwood.config import Config, raw_config, validate
from sapwood.data.text import read_meta, stdlib_corpus, tokenize_corpus

DEMO_CONFIG = Path(__file__).with_name("lm.yaml")
DEMO_FILES = 200
DEMO_VOCAB = 4096
DEMO_VAL_FRACTION = 0.1
console = Console()


def demo_config(tokens: Path, out_dir: Path, source: Path = DEMO_CONFIG) -> Config:
    data, _ = raw_config(source)
    data["data"]["path"] = str(tokens)
    data["train"]["out_dir"] = str(out_dir)
    return validate(Config, data, where=f"{source.name}: ")


def language_model_stage(out: Path) -> dict[str, Any]:
    """Tokenize, train and evaluate; print val loss against the unigram baseline. Returns the summary."""
    from sapwood.train.loop import train

    tokens, lm_dir = out / "tokens", out / "lm"
    start = time.perf_counter()
    if not (tokens / "meta.json").exists():
        files = stdlib_corpus(DEMO_FILES)
        console.print(f"tokenizing {len(files)} standard-library files (vocab {DEMO_VOCAB}) -> {tokens}")
        tokenize_corpus(files, tokens, vocab_size=DEMO_VOCAB, val_fraction=DEMO_VAL_FRACTION)
    meta = read_meta(tokens)
    console.print(
        f"tokens: train {meta['train_tokens']:,}, val {meta['val_tokens']:,} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    shutil.rmtree(lm_dir, ignore_errors=True)  # the demo owns this folder; every run starts fresh
    config = demo_config(tokens, lm_dir)
    summary = train(config)
    baseline = meta["val_unigram_entropy"]
    verdict = "below" if summary["val_loss"] < baseline else "NOT below"
    console.print(
        f"final validation loss {summary['val_loss']:.3f} nats/token "
        f"(perplexity {summary['val_perplexity']:.1f}, "
        f"next-token accuracy {summary['val_accuracy']:.1%}) vs unigram-entropy baseline {baseline:.3f}: "
        f"{baseline - summary['val_loss']:.3f} nats {verdict}"
    )
    console.print(f"loss plot {summary['plot']}; checkpoint folder {summary['final']}")
    return summary
