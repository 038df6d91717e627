"""Supervised fine-tuning (``train.task: sft``, ``sapwood finetune``): a base checkpoint trained on chat or
instruction JSONL (:mod:`sapwood.train.sft_data`), the full model or LoRA adapters
(:mod:`sapwood.model.lora`).

The model starts from the base's weights (:class:`BaseInitialized`: its ``init_weights`` loads them, so the
training loop's meta-device build, parallelism and resume work unchanged). With ``sft.lora`` only the adapters
train; ``final/`` is then a PEFT adapter folder (serve it with ``sapwood serve BASE --lora NAME=RUN/final``,
or merge it with ``sapwood merge-lora``); without, ``final/`` is a normal checkpoint folder with the base's
tokenizer and chat template.

Evaluation: the held-out loss on assistant tokens (``val_loss``) and the exact match of greedy answers to the
held-out examples' last assistant turns (``exact_match``, both stripped of surrounding white space).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sapwood import fsutil
from sapwood.config import Config, load_config, raw_config, validate
from sapwood.errors import ConfigError, SapwoodError
from sapwood.infer.tokenizer import TextTokenizer
from sapwood.model import lora
from sapwood.model.folder import read_weights, write_folder_files
from sapwood.model.hf import SIDECAR_FILES
from sapwood.model.transformer import Decoder
from sapwood.train.parallel import ParallelModel
from sapwood.train.sft_data import (
    IGNORE,
    DocumentMask,
    Example,
    PackedRows,
    pack,
    read_conversations,
    render_example,
    split_held_out,
    stack,
)

ADAPTER = "default"


def finetune_config(source: str | Path) -> Config:
    """The validated config of a fine-tuning YAML: ``model`` comes from ``sft.base``'s config.yaml (a
    ``model`` section in the YAML may only repeat it)."""
    data, path = raw_config(source)
    where = f"{path.name if path else source}: "
    sft = data.get("sft")
    if not isinstance(sft, dict) or not sft.get("base"):
        raise ConfigError(f"{where}needs sft: {{base: CHECKPOINT, data: FILE.jsonl}}")
    base_folder = Path(sft["base"])
    if not (base_folder / "config.yaml").is_file():
        raise ConfigError(
            f"{where}sft.base={str(base_folder)!r} is not a sapwood checkpoint folder (no config.yaml)"
        )
    base = load_config(base_folder)
    if "model" in data and validate(type(base.model), data["model"], where) != base.model:
        raise ConfigError(
            f"{where}model: differs from the base checkpoint's; remove the model section "
            "(fine-tuning keeps the base's shape)"
        )
    data["model"] = base.model.model_dump(mode="json", exclude_none=True)
    config = validate(Config, data, where)
    if config.train is None:
        raise ConfigError(f"{where}needs a train section: train: {{steps: N, ...}}")
    return config


class BaseInitialized(Decoder):
    """A Decoder whose ``init_weights`` loads the base checkpoint's weights into it (adapters, if injected,
    get PEFT's initialization)."""

    def __init__(self, cfg, base_folder: Path, frozen_dtype: str = "fp32"):
        self.base_folder, self.frozen_dtype = base_folder, frozen_dtype
        super().__init__(cfg)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        super().init_weights(generator)  # the rotary buffer and anything the base lacks
        if getattr(self, "base_folder", None) is None:
            return
        lora.load_base_state(self, read_weights(self.base_folder))
        lora.reset_adapters(self)
        if self.frozen_dtype == "bf16":  # the frozen base in a smaller dtype; the adapters stay fp32
            for param in self.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(torch.bfloat16)
        elif self.frozen_dtype == "int8":
            lora.quantize_frozen_linears(self)


class SFTTask:
    """Fine-tuning on ``config.sft`` (see the module docstring)."""

    unit_name = "tok"

    def __init__(self, config: Config):
        if config.sft is None:
            raise ConfigError(
                "train.task='sft' needs an sft section: sft: {base: CHECKPOINT, data: FILE.jsonl}"
            )
        sft = self.sft = config.sft
        self.config = config
        if config.parallel.pp > 1:
            raise ConfigError(
                f"parallel.pp={config.parallel.pp}: fine-tuning passes document masks through every "
                "block; use pp: 1"
            )
        if config.train is not None and config.train.loss_chunk is not None:
            raise ConfigError(
                "train.loss_chunk is not supported by train.task='sft' (its loss is masked); remove it"
            )
        self.base = Path(sft.base)
        self.tokenizer = TextTokenizer.from_folder(self.base)
        self.seq_len = sft.seq_len or config.model.trained_context
        if self.seq_len > config.model.max_context:
            raise ConfigError(
                f"sft.seq_len={self.seq_len} exceeds model.max_context={config.model.max_context}"
            )
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"the base tokenizer has {self.tokenizer.vocab_size} tokens, more than "
                f"model.vocab_size={config.model.vocab_size}"
            )
        if sft.lora is not None:
            lora.check_family(config.model)
            precision = config.train.precision if config.train else "fp32"
            if sft.lora.base_dtype == "bf16" and precision != "bf16":
                raise ConfigError(
                    f"sft.lora.base_dtype='bf16' needs train.precision: bf16 (got {precision!r}): the "
                    "bf16 base runs under bf16 autocast"
                )
            if sft.lora.base_dtype == "int8" and precision != "fp32":
                raise ConfigError(
                    f"sft.lora.base_dtype='int8' needs train.precision: fp32 (got {precision!r}): the "
                    "int8 weights are dequantized to fp32 in every matmul"
                )
            if sft.lora.base_dtype == "int8" and config.parallel.world_size > 1:
                raise ConfigError(
                    f"sft.lora.base_dtype='int8' runs in one process (parallel world size "
                    f"{config.parallel.world_size}); use base_dtype: bf16 or fp32 to shard"
                )
        conversations = read_conversations(sft.data)
        if sft.val_data:
            train, held_out = conversations, read_conversations(sft.val_data)
        else:
            train, held_out = split_held_out(conversations, sft.val_fraction)
        self.train_examples = [render_example(self.tokenizer, m) for m in train]
        self.val_examples = [render_example(self.tokenizer, m) for m in held_out]
        self.seed = config.train.seed if config.train else 0

    # --- the model ---------------------------------------------------------------------------
    def lora_config(self):
        spec = self.sft.lora
        return lora.peft_config(spec.rank, spec.alpha, spec.dropout, spec.targets, str(self.base))

    def build_model(self, config: Config) -> nn.Module:
        frozen = self.sft.lora.base_dtype if self.sft.lora is not None else "fp32"
        model = BaseInitialized(config.model, self.base, frozen)
        if self.sft.lora is not None:
            lora.add_adapter(model, ADAPTER, self.lora_config())
        return model

    def save_final(self, model: nn.Module, config: Config, out: Path) -> None:
        """Write ``final/`` into the (staging) folder ``out``: the adapter, or the whole fine-tuned model with
        the base's tokenizer, chat template and generation config."""
        if self.sft.lora is not None:
            lora.write_adapter_files(model, ADAPTER, out, self.base)
            return
        write_with_base_files(model, config, out, self.base)

    # --- data and loss -----------------------------------------------------------------------
    def train_batches(self, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> PackedRows:
        return PackedRows(
            self.train_examples, self.seq_len, micro_batch_size, self.seed, self.sft.pack, rank, world_size
        )

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["tokens"], positions=batch["positions"], kv_cache=DocumentMask(batch["documents"]))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy over the assistant tokens of the micro-batch."""
        logits = self.logits(model, batch)
        targets = batch["targets"]
        count = int((targets != IGNORE).sum())
        total = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return total / max(count, 1), {"assistant_tokens": float(count)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, micro_batch_size: int, batches: int = 8) -> dict[str, float]:
        """``val_loss`` (nats per assistant token) on every held-out example and ``exact_match`` on the first
        ``sft.eval_examples`` of them."""
        if not self.val_examples:
            return {}
        device = next(model.parameters()).device
        rows = pack(self.val_examples, list(range(len(self.val_examples))), self.seq_len, self.sft.pack)
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for start in range(0, len(rows), micro_batch_size):
            batch = {k: v.to(device) for k, v in stack(rows[start : start + micro_batch_size]).items()}
            logits = self.logits(model, batch).float()
            total += (
                F.cross_entropy(
                    logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum"
                )
                .double()
                .cpu()
            )
            count += int((batch["targets"] != IGNORE).sum())
        metrics = {"val_loss": float(total / max(count, 1))}
        if self.sft.eval_examples:
            # generation runs the inference engine on the plain module the trainer's ParallelModel holds
            plain = model.model if isinstance(model, ParallelModel) else model
            metrics["exact_match"] = exact_match(
                plain, self.tokenizer, self.val_examples[: self.sft.eval_examples], self.sft.max_new_tokens
            )
        return metrics

    def count_units(self, batch: Any) -> int:
        return int((batch["documents"] >= 0).sum())

    def tokenizer_file(self) -> Path | None:
        return self.base / "tokenizer.json"


def answers(
    model: nn.Module, tokenizer: TextTokenizer, examples: list[Example], max_new_tokens: int
) -> list[str]:
    """Greedy answers of ``model`` to the examples' prompts, batched through the inference engine."""
    from sapwood.infer.engine import Engine
    from sapwood.infer.sampling import SamplingParams
    from sapwood.infer.scheduler import SchedulerConfig

    parameter = next(model.parameters())
    per_row = 2 * model.cfg.layers * model.cfg.kv_heads * model.cfg.head_dim * parameter.element_size()
    longest = max(len(e.prompt_ids) for e in examples) + max_new_tokens
    scheduler = SchedulerConfig(
        max_batch=64, max_waiting=len(examples) + 1, kv_memory_bytes=per_row * (longest + 64) * 64
    )
    engine = Engine(model, tokenizer, scheduler)
    was_training = model.training
    params = SamplingParams(max_tokens=max_new_tokens, greedy=True)
    try:
        requests = engine.generate([e.prompt_ids for e in examples], params)
    finally:
        model.train(was_training)
    failed = [r for r in requests if r.finish_reason == "error"]
    if failed:
        raise SapwoodError(f"generation failed for {len(failed)} held-out examples ({failed[0].error})")
    return [r.stream.text for r in requests]


def exact_match(
    model: nn.Module, tokenizer: TextTokenizer, examples: list[Example], max_new_tokens: int
) -> float:
    """Share of ``examples`` whose greedy answer equals the reference (both stripped)."""
    if not examples:
        return float("nan")
    got = answers(model, tokenizer, examples, max_new_tokens)
    return sum(a.strip() == e.answer.strip() for a, e in zip(got, examples, strict=True)) / len(examples)


def load_examples(path: str | Path, base: str | Path) -> list[Example]:
    """The examples of a JSONL file rendered with ``base``'s tokenizer and chat template."""
    tokenizer = TextTokenizer.from_folder(base)
    return [render_example(tokenizer, m) for m in read_conversations(path)]


def merge_lora_folder(adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """A checkpoint folder ``out``: the base with the adapter merged in, its tokenizer and chat template."""
    from sapwood.model.folder import load

    adapter = Path(adapter)
    _, _, recorded = lora.read_adapter(adapter)
    base = Path(base or recorded or "")
    if not base.name or not (base / "config.yaml").is_file():
        raise SapwoodError(f"{adapter}: base checkpoint {str(base)!r} not found; pass --base CHECKPOINT")
    merged = lora.merge_adapter(load(base), adapter)
    out = Path(out)
    with fsutil.staged_dir(out) as staged:
        write_with_base_files(merged, load_config(base), staged, base)
    return out


def write_with_base_files(model: nn.Module, config: Config, folder: Path, base: Path) -> None:
    """A checkpoint's files in the (staging) ``folder``, with ``base``'s tokenizer, chat template and
    generation config beside them."""
    tokenizer = base / "tokenizer.json"
    write_folder_files(model, config, folder, tokenizer if tokenizer.exists() else None)
    for name in SIDECAR_FILES:
        if (base / name).exists():
            shutil.copyfile(base / name, folder / name)


def training_state_bytes(model: nn.Module, optimizer: Any) -> dict[str, int]:
    """Measured from a run's live objects: trainable parameters, the bytes of their gradients plus every
    optimizer state tensor (AdamW's two moments) -- what full fine-tuning needs for every weight and LoRA only
    for the adapters --, and the bytes of all weights (a bf16 frozen base halves those, int8 quarters its
    linear layers; a quantized weight counts its int8 data and scales)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    optimizers = getattr(optimizer, "optimizers", [optimizer])
    states = sum(
        t.numel() * t.element_size()
        for o in optimizers
        for state in o.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    weights = sum(lora.tensor_bytes(p) for p in model.parameters())
    return {
        "trainable_parameters": sum(p.numel() for p in trainable),
        "state_bytes": grads + states,
        "weight_bytes": weights,
    }
