"""The demo's fine-tuning stage: the demo's tiny language model (``DEMO/lm/final``, pre-trained on Python
code) taught to answer unit conversions, once by full fine-tuning and once with LoRA adapters, with the
held-out exact match before and after and the training-state memory each needed; then both served by one
server.

The instruction set is generated (:func:`conversion_records`): "Convert km to m: 3 7" -> "3 7 0 0 0", over
six metric conversions, the digits spaced so that each is one token; the held-out questions (value and units)
never occur in training. Writes ``DEMO/sft``: ``data/`` (train.jsonl, val.jsonl), ``full.yaml`` and
``lora.yaml`` (rerun them with ``sapwood finetune``), and the runs ``full/`` (``final/`` a checkpoint
folder) and ``lora/`` (``final/`` a PEFT adapter folder).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from sapwood.errors import SapwoodError

console = Console()
CONVERSIONS = (
    ("km", "m", 3), ("m", "cm", 2), ("m", "mm", 3), ("kg", "g", 3), ("L", "mL", 3), ("cm", "mm", 1),
)
QUESTION = "Convert {source} to {target}: {value}"  # the value last, next to the answer that repeats it
VALUES = (1, 999)  # the range of the values converted
TRAIN_EXAMPLES = 3000
VAL_EXAMPLES = 100
COMMON_TRAIN = {
    "batch_size": 16, "micro_batch_size": 16, "warmup_steps": 10, "weight_decay": 0.0, "eval_every": 1000,
    "save_every": 1000, "log_every": 10, "seed": 0, "progress": True,
}
RUNS = {
    # the full run learns to copy the digits between steps 60 and 240 (held-out exact match 0 / 40 / 85 % at
    # steps 60 / 120 / 240 on the demo's base); 120 steps with the same schedule end near 20 %
    "full": {"train": {"steps": 240, "lr": 3.0e-3, "min_lr": 3.0e-4}, "sft": {}},
    # LoRA steps cost about what full steps do (the backward still runs through every layer); on the demo's
    # base it learns the zeros but not the copying (about 1 % at 100 and 200 steps), so it gets fewer steps;
    # above lr 4e-3 (alpha / rank = 2) its loss rises in the first steps
    "lora": {
        "train": {"steps": 120, "lr": 2.0e-3, "min_lr": 2.0e-4},
        "sft": {"lora": {"rank": 16, "alpha": 32, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}},
    },
}


def spaced(number: int) -> str:
    """``number``'s digits separated by spaces ("37000" -> "3 7 0 0 0"): one token per digit in the byte-level
    BPE tokenizer, so the answer is the question's digits copied plus a constant suffix of zeros."""
    return " ".join(str(number))


def conversion_records(
    count: int, seed: int, exclude: set[str] = frozenset(), question: str = QUESTION,
    spaced_digits: bool = True,
) -> list[dict[str, str]]:
    """``count`` distinct instruction records "Convert A to B: V" -> V * 10^k, none of whose instruction is in
    ``exclude``; with ``spaced_digits`` both numbers are written digit by digit ("3 7" -> "3 7 0 0 0")."""
    digits = spaced if spaced_digits else str
    rng = random.Random(seed)
    records: dict[str, str] = {}
    while len(records) < count:
        source, target, power = rng.choice(CONVERSIONS)
        value = rng.randint(*VALUES)
        instruction = question.format(value=digits(value), source=source, target=target)
        if instruction not in exclude:
            records[instruction] = digits(value * 10**power)
    return [{"instruction": k, "output": v} for k, v in records.items()]


def write_instruction_set(
    folder: Path, train: int = TRAIN_EXAMPLES, val: int = VAL_EXAMPLES, seed: int = 0,
    question: str = QUESTION, spaced_digits: bool = True,
) -> tuple[Path, Path]:
    """``folder/train.jsonl`` and ``folder/val.jsonl`` (disjoint questions)."""
    folder.mkdir(parents=True, exist_ok=True)
    held_out = conversion_records(val, seed + 1, question=question, spaced_digits=spaced_digits)
    exclude = {r["instruction"] for r in held_out}
    training = conversion_records(train, seed, exclude, question=question, spaced_digits=spaced_digits)
    paths = folder / "train.jsonl", folder / "val.jsonl"
    for path, records in zip(paths, (training, held_out), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def run_config(base: Path, data: tuple[Path, Path], out_dir: Path, run: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"demo-sft-{out_dir.name}",
        "sft": {
            "base": str(base), "data": str(data[0]), "val_data": str(data[1]), "seq_len": 64,
            "eval_examples": VAL_EXAMPLES, "max_new_tokens": 12, **run["sft"],
        },
        "train": {**COMMON_TRAIN, **run["train"], "out_dir": str(out_dir)},
    }


def sft_stage(out: Path) -> dict[str, Any]:
    """Fine-tune the demo's language model fully and with LoRA; exact match before and after; serve both."""
    from sapwood.model.folder import load
    from sapwood.train.callbacks import callbacks_from_config
    from sapwood.train.loop import Trainer
    from sapwood.train.sft import SFTTask, exact_match, finetune_config, training_state_bytes

    base = out / "lm" / "final"
    if not (base / "config.yaml").exists():
        raise SapwoodError(
            f"the sft stage fine-tunes the lm stage's model, and {base} does not exist; "
            "run `sapwood demo --only lm,sft`"
        )
    folder = out / "sft"
    shutil.rmtree(folder, ignore_errors=True)
    data = write_instruction_set(folder / "data")
    console.print(
        f"instruction set: {TRAIN_EXAMPLES} training and {VAL_EXAMPLES} held-out unit conversions "
        f"({data[0]}), e.g. {json.loads(data[1].read_text().splitlines()[0])}"
    )
    results: dict[str, Any] = {}
    for name, run in RUNS.items():
        config_path = folder / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(run_config(base, data, folder / name, run), sort_keys=False))
        config = finetune_config(config_path)
        task = SFTTask(config)
        if "before" not in results:
            results["before"] = exact_match(
                load(base), task.tokenizer, task.val_examples, config.sft.max_new_tokens
            )
            console.print(f"held-out exact match of the base model: {results['before']:.0%}")
        start, cpu = time.perf_counter(), time.process_time()
        trainer = Trainer(config, callbacks_from_config(config))
        summary = trainer.fit()
        results[name] = {
            **summary, **training_state_bytes(trainer.model, trainer.optimizer),
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "config": str(config_path),
        }
        console.print(f"{name}: held-out exact match {results['before']:.0%} -> {summary['exact_match']:.0%}")
    table = Table(
        title=f"fine-tuning: exact match of greedy answers to {VAL_EXAMPLES} held-out questions, "
        "and the training state"
    )
    for column in ("run", "exact match", "val loss", "trainable params", "grads + AdamW state", "time (CPU)"):
        table.add_column(column, justify="left" if column == "run" else "right")
    table.add_row("base (lm stage)", f"{results['before']:.0%}", "", "", "", "")
    for name in RUNS:
        r = results[name]
        table.add_row(
            name, f"{results['before']:.0%} -> {r['exact_match']:.0%}", f"{r['val_loss']:.3f}",
            f"{r['trainable_parameters']:,}", f"{r['state_bytes'] / 2**20:.2f} MiB",
            f"{r['seconds']:.0f}s ({r['cpu_seconds']:.0f}s)",
        )
    console.print(table)
    saved = 1 - results["lora"]["state_bytes"] / results["full"]["state_bytes"]
    console.print(
        f"LoRA keeps {saved:.1%} less training state (gradients + optimizer moments) than full fine-tuning; "
        f"rerun with `sapwood finetune {folder / 'lora.yaml'}`, merge with `sapwood merge-lora "
        f"{folder / 'lora' / 'final'} --out merged`"
    )
    results["served"] = serve_both(base, folder / "lora" / "final", data[1])
    return results


def serve_both(base: Path, adapter: Path, val: Path) -> dict[str, str]:
    """One server with the base and the LoRA adapter (``--lora demo-lora=...``); one held-out question to each
    through the openai client."""
    from openai import OpenAI

    from sapwood.serve.app import create_app
    from sapwood.serve.server import BackgroundServer
    from sapwood.serve.settings import ServeSettings

    question = json.loads(val.read_text().splitlines()[0])
    settings = ServeSettings(model_name="demo-base", lora_adapters={"demo-lora": str(adapter)})
    answers = {}
    with BackgroundServer(create_app(base, settings, api_keys=frozenset()), settings) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        served = [m.id for m in client.models.list().data]
        for model in served:
            reply = client.chat.completions.create(
                model=model, max_tokens=12, temperature=0,
                messages=[{"role": "user", "content": question["instruction"]}],
            )
            answers[model] = reply.choices[0].message.content.strip()
    console.print(
        f"served {served} from one base; {question['instruction']!r} (reference {question['output']}): "
        + ", ".join(f"{k} -> {v!r}" for k, v in answers.items())
    )
    return answers
