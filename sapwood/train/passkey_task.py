"""Passkey retrieval (Mohtashami & Jaggi 2023; the check YaRN and LongRoPE report at extended lengths), as a
synthetic task a tiny model learns on the CPU in minutes (``train.task: passkey``).

A sequence is filler, a ``KEY`` token followed by the passkey's digits hidden at some depth, more filler,
and at the end a ``QUERY`` token followed by the same digits. The model is trained (and scored) on the
answer only: every digit after ``QUERY``. Tokens: ``0..9`` digits, :data:`KEY`, :data:`QUERY`, then
:data:`FILLER` filler tokens drawn uniformly (vocabulary :data:`VOCAB`). Sequences have the task's
``seq_len`` tokens: ``context.seq_len`` for a context-extension fine-tune (or, per micro-batch, one of
``context.mixed_lengths``), else ``model.trained_context``.
:func:`passkey_accuracy` scores a model at any length and depth: a sample counts when every answer digit
is the argmax (teacher forcing, so equal to greedy decoding whenever it counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sapwood.errors import ConfigError

DIGITS = 4
KEY, QUERY = 10, 11
FILLER = 20
VOCAB = 12 + FILLER
IGNORE = -100


def passkey_batch(
    length: int, depths: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[n, length]`` and targets (``IGNORE`` except the answer digits) for ``n = len(depths)``
    samples; depth 0 puts the key first, 1 right before the query."""
    if length < 2 * DIGITS + 2:
        raise ConfigError(f"passkey sequences need at least {2 * DIGITS + 2} tokens; got {length}")
    count = depths.shape[0]
    filler = length - 2 * DIGITS - 1  # length + 1 tokens: filler, KEY d.., QUERY d..
    tokens = torch.randint(12, VOCAB, (count, length + 1), generator=generator)
    digits = torch.randint(0, 10, (count, DIGITS), generator=generator)
    starts = (depths.clamp(0, 1) * filler).round().long()
    for row, start in enumerate(starts.tolist()):
        tokens[row, start] = KEY
        tokens[row, start + 1 : start + 1 + DIGITS] = digits[row]
    tokens[:, -DIGITS - 1] = QUERY
    tokens[:, -DIGITS:] = digits
    targets = torch.full((count, length), IGNORE)
    targets[:, -DIGITS:] = digits
    return tokens[:, :-1], targets


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def passkey_accuracy(
    model: nn.Module, length: int, samples: int = 32, seed: int = 0, batch: int = 8
) -> float:
    """Fraction of ``samples`` sequences of ``length`` tokens (key depths evenly from 0 to 1) whose every
    answer digit is the model's argmax."""
    generator = torch.Generator().manual_seed(seed)
    depths = torch.linspace(0, 1, samples)
    device = next(model.parameters()).device
    correct = 0
    for chunk in depths.split(batch):
        inputs, targets = passkey_batch(length, chunk, generator)
        logits = model(inputs.to(device))[:, -DIGITS:]
        correct += int((logits.argmax(-1).cpu() == targets[:, -DIGITS:]).all(-1).sum())
    return correct / samples


class PasskeyBatches:
    """Endless random passkey micro-batches, reproducible from the seed and the count drawn so far; with
    ``lengths`` each micro-batch's length is drawn from that list (mixed-length fine-tuning)."""

    def __init__(self, seq_len: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        self.seq_len, self.batch_size, self.seed, self.drawn = seq_len, batch_size, seed, 0
        self.lengths = list(lengths) if lengths else None

    def __iter__(self) -> PasskeyBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.drawn)
        self.drawn += 1
        length = self.seq_len
        if self.lengths is not None:
            length = self.lengths[int(torch.randint(len(self.lengths), (1,), generator=generator))]
        return passkey_batch(length, torch.rand(self.batch_size, generator=generator), generator)

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = int(state["drawn"])


class PasskeyTask:
    """``train.task: passkey``: the model (``vocab_size`` >= :data:`VOCAB`) learns to retrieve the key."""

    unit_name = "tok"

    def __init__(self, config: Any):
        if config.model.vocab_size < VOCAB:
            raise ConfigError(
                f"model.vocab_size={config.model.vocab_size} is below the passkey task's {VOCAB} tokens"
            )
        extension = getattr(config, "context", None)
        self.seq_len = extension.seq_len if extension is not None else config.model.trained_context
        self.lengths = extension.mixed_lengths if extension is not None else None
        self.seed = config.train.seed if config.train is not None else 0

    def build_model(self, config: Any) -> nn.Module:
        from sapwood.model import build_model

        return build_model(config, "meta")

    def train_batches(self, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> PasskeyBatches:
        return PasskeyBatches(self.seq_len, micro_batch_size, self.seed + 7919 * rank, self.lengths)

    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = batch
        return answer_loss(model(inputs), targets), {}

    def evaluate(self, model: nn.Module, micro_batch_size: int, batches: int = 8) -> dict[str, float]:
        accuracy = passkey_accuracy(
            model, self.seq_len, micro_batch_size * batches, seed=12345, batch=micro_batch_size
        )
        return {"passkey_accuracy": accuracy}

    def count_units(self, batch: Any) -> int:
        return int(batch[0].numel())

    def tokenizer_file(self) -> Path | None:
        return None
