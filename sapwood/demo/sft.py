"""The demo's fine-tuning stage: the demo's tiny language model (``DEMO/lm/final``, pre-trained on Python
code) taught to answer generated questions, once by full fine-tuning and once with LoRA adapters, with the
held-out exact match before and after per task type, next to the best constant answer's, and the
training-state memory each needed; then both served by one server.

The instruction set (:func:`instruction_records`) mixes three task types in turn, each answer one word from a
small vocabulary, so that no answer is a copy of the question's digits: parity ("Even or odd: 4 8 2 7" ->
"odd"), the last digit in words ("Last digit in words: 4 8 2 7" -> "seven") and the larger of two units of
one kind ("Which is more: 3 5 g or 3 5 kg" -> "kg"). Values have 1 to 5 digits, spaced so that each is one
token; the held-out questions never occur in training. Writes ``DEMO/sft``: ``data/`` (train.jsonl,
val.jsonl; ``task`` names each record's type), ``full.yaml`` and ``lora.yaml`` (rerun them with ``sapwood
finetune``), and the runs ``full/`` (``final/`` a checkpoint folder) and ``lora/`` (``final/`` a PEFT
adapter folder).
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
TASKS = ("parity", "last digit", "larger unit")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
UNITS = (("km", "m", "cm", "mm"), ("kg", "g", "mg"), ("L", "mL"))  # each family from the largest unit down
UNIT_ORDER = [unit for family in UNITS for unit in family]
UNIT_PAIRS = [(a, b) for family in UNITS for i, a in enumerate(family) for b in family[i + 1 :]]
TRAIN_EXAMPLES = 3000
VAL_EXAMPLES = 150
COMMON_TRAIN = {
    "batch_size": 16, "micro_batch_size": 16, "warmup_steps": 10, "weight_decay": 0.0, "eval_every": 1000,
    "save_every": 1000, "log_every": 10, "seed": 0, "progress": True,
}
RUNS = {
    # held-out exact match on the demo's base: 37 / 58 / 77 % at steps 40 / 80 / 120; a run of 80 steps ends
    # at 39-64 % depending on the base and the seed
    "full": {"train": {"steps": 120, "lr": 3.0e-3, "min_lr": 3.0e-4}, "sft": {}},
    # LoRA learns more slowly (it leaves the tied token embeddings frozen, which full fine-tuning can
    # reshape): after 120 steps of 16 it still gives one answer per type (e.g. always "even"); with steps of 8
    # it reaches 34 / 36 / 48 % at steps 160 / 320 / 400; lr 1e-2 diverges, alpha 64 or rank 32 is no better
    "lora": {
        "train": {"steps": 400, "batch_size": 8, "micro_batch_size": 8, "lr": 4.0e-3, "min_lr": 4.0e-4},
        "sft": {"lora": {"rank": 16, "alpha": 32, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}},
    },
}


def spaced(number: int) -> str:
    """``number``'s digits separated by spaces ("4827" -> "4 8 2 7"): one token per digit in the byte-level
    BPE tokenizer, whatever the neighbouring digits."""
    return " ".join(str(number))


def number(rng: random.Random) -> int:
    """A value of 1 to 5 digits, each length equally likely."""
    digits = rng.randint(1, 5)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def task_record(task: str, rng: random.Random) -> dict[str, str]:
    """One generated question of type ``task`` (one of :data:`TASKS`) and its only correct answer."""
    value = number(rng)
    if task == "parity":
        return {"instruction": f"Even or odd: {spaced(value)}", "output": "odd" if value % 2 else "even"}
    if task == "last digit":
        return {"instruction": f"Last digit in words: {spaced(value)}", "output": DIGIT_WORDS[value % 10]}
    if task == "larger unit":
        first, second = rng.sample(rng.choice(UNIT_PAIRS), 2)
        larger = min(first, second, key=lambda unit: UNIT_ORDER.index(unit))
        return {"instruction": f"Which is more: {spaced(value)} {first} or {spaced(value)} {second}",
                "output": larger}
    raise SapwoodError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def instruction_records(
    count: int, seed: int, exclude: set[str] = frozenset(), tasks: tuple[str, ...] = TASKS
) -> list[dict[str, str]]:
    """``count`` distinct instruction records, the task types in turn (``task`` names each record's type),
    none of whose instruction is in ``exclude``."""
    rng = random.Random(seed)
    records: dict[str, dict[str, str]] = {}
    while len(records) < count:
        task = tasks[len(records) % len(tasks)]
        record = task_record(task, rng)
        if record["instruction"] not in exclude and record["instruction"] not in records:
            records[record["instruction"]] = {**record, "task": task}
    return list(records.values())


def write_instruction_set(
    folder: Path, train: int = TRAIN_EXAMPLES, val: int = VAL_EXAMPLES, seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
) -> tuple[Path, Path]:
    """``folder/train.jsonl`` and ``folder/val.jsonl`` (disjoint questions)."""
    folder.mkdir(parents=True, exist_ok=True)
    held_out = instruction_records(val, seed + 1, tasks=tasks)
    exclude = {r["instruction"] for r in held_out}
    training = instruction_records(train, seed, exclude, tasks=tasks)
    paths = folder / "train.jsonl", folder / "val.jsonl"
    for path, records in zip(paths, (training, held_out), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def chance_level(records: list[dict[str, str]]) -> float:
    """The exact match of the best constant answer: the share of ``records`` with the commonest output."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r["output"]] = counts.get(r["output"], 0) + 1
    return max(counts.values()) / len(records)


def run_config(base: Path, data: tuple[Path, Path], out_dir: Path, run: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"demo-sft-{out_dir.name}",
        "sft": {
            "base": str(base), "data": str(data[0]), "val_data": str(data[1]), "seq_len": 64,
            "eval_examples": VAL_EXAMPLES, "max_new_tokens": 6, **run["sft"],
        },
        "train": {**COMMON_TRAIN, **run["train"], "out_dir": str(out_dir)},
    }


def by_task(records: list[dict[str, str]], got: list[str]) -> dict[str, float]:
    """Exact match of the answers ``got`` to ``records`` per task type and over all (``"all"``)."""
    right = [a.strip() == r["output"] for a, r in zip(got, records, strict=True)]
    shares = {t: [ok for ok, r in zip(right, records, strict=True) if r["task"] == t] for t in TASKS}
    return {**{t: sum(v) / len(v) for t, v in shares.items() if v}, "all": sum(right) / len(right)}


def sft_stage(out: Path) -> dict[str, Any]:
    """Fine-tune the demo's language model fully and with LoRA; exact match before and after, per task type
    next to the best constant answer's; serve both."""
    from sapwood.model.folder import load
    from sapwood.train.callbacks import callbacks_from_config
    from sapwood.train.loop import Trainer
    from sapwood.train.sft import SFTTask, answers, finetune_config, training_state_bytes

    base = out / "lm" / "final"
    if not (base / "config.yaml").exists():
        raise SapwoodError(
            f"the sft stage fine-tunes the lm stage's model, and {base} does not exist; "
            "run `sapwood demo --only lm,sft`"
        )
    folder = out / "sft"
    shutil.rmtree(folder, ignore_errors=True)
    data = write_instruction_set(folder / "data")
    held_out = [json.loads(line) for line in data[1].read_text().splitlines()]
    examples = {r["task"]: r for r in reversed(held_out)}
    console.print(
        f"instruction set: {TRAIN_EXAMPLES} training and {VAL_EXAMPLES} held-out questions ({data[0]}), "
        f"{len(TASKS)} types in turn, none held out seen in training: "
        + "; ".join(f"{r['instruction']!r} -> {r['output']!r}" for r in examples.values())
    )
    results: dict[str, Any] = {
        "chance": {
            **{t: chance_level([r for r in held_out if r["task"] == t]) for t in TASKS},
            "all": sum(chance_level([r for r in held_out if r["task"] == t]) for t in TASKS) / len(TASKS),
        }
    }
    for name, run in RUNS.items():
        config_path = folder / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(run_config(base, data, folder / name, run), sort_keys=False))
        config = finetune_config(config_path)
        task = SFTTask(config)
        tokens = config.sft.max_new_tokens
        if "before" not in results:
            got = answers(load(base), task.tokenizer, task.val_examples, tokens)
            results["before"] = by_task(held_out, got)
            console.print(f"held-out exact match of the base model: {results['before']['all']:.0%}")
        start, cpu = time.perf_counter(), time.process_time()
        trainer = Trainer(config, callbacks_from_config(config))
        summary = trainer.fit()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        results[name] = {
            **summary, **training_state_bytes(trainer.model, trainer.optimizer),
            "by_task": by_task(held_out, answers(trainer.model, task.tokenizer, task.val_examples, tokens)),
            "seconds": seconds, "cpu_seconds": cpu_seconds, "config": str(config_path),
        }
        console.print(
            f"{name}: held-out exact match {results['before']['all']:.0%} -> {summary['exact_match']:.0%}"
        )
    table = Table(
        title=f"held-out exact match (greedy answers to {VAL_EXAMPLES} questions unseen in training); "
        "chance = the best constant answer per type"
    )
    for column in ("task type", "chance", "base", "full fine-tune", "LoRA"):
        table.add_column(column, justify="left" if column == "task type" else "right")
    for t in (*TASKS, "all"):
        table.add_row(
            t if t != "all" else "all (chance: per-type best constant)", f"{results['chance'][t]:.0%}",
            f"{results['before'][t]:.0%}", *(f"{results[n]['by_task'][t]:.0%}" for n in RUNS),
        )
    console.print(table)
    table = Table(title="fine-tuning runs: training state and time")
    for column in ("run", "val loss", "trainable params", "grads + AdamW state", "time (CPU)"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name in RUNS:
        r = results[name]
        table.add_row(
            name, f"{r['val_loss']:.3f}", f"{r['trainable_parameters']:,}",
            f"{r['state_bytes'] / 2**20:.2f} MiB", f"{r['seconds']:.0f}s ({r['cpu_seconds']:.0f}s)",
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
