"""The language-model task: next-token prediction on token shards from ``sapwood tokenize``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sapwood.config import Config
from sapwood.data.text import TOKENIZER, TokenShards, WindowLoader, read_meta
from sapwood.errors import ConfigError
from sapwood.model import build_model
from sapwood.train.chunked_loss import lm_loss_chunked


class TextTask:
    """Causal LM on random windows of ``data.seq_len`` (default ``model.trained_context``) tokens."""

    def __init__(self, config: Config):
        if config.data is None:
            raise ConfigError(
                "train.task='text' needs a data section: data: {path: TOKENS_DIR} (from `sapwood tokenize`)"
            )
        self.config = config
        self.folder = Path(config.data.path)
        self.meta = read_meta(self.folder)
        extension = getattr(config, "context", None)  # a context-extension fine-tune trains at its length
        self.seq_len = config.data.seq_len or (extension.seq_len if extension is not None else None) \
            or config.model.trained_context
        if self.meta["vocab_size"] > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                f"{self.meta['vocab_size']} tokens in {self.folder}; raise it to at least "
                f"{self.meta['vocab_size']}"
            )
        if self.seq_len > config.model.max_context:
            raise ConfigError(
                f"data.seq_len={self.seq_len} exceeds model.max_context={config.model.max_context}"
            )
        self.seed = config.train.seed if config.train else 0
        self._val: WindowLoader | None = None

    def build_model(self, config: Config) -> nn.Module:
        return build_model(config, "meta")

    def train_batches(self, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> WindowLoader:
        return WindowLoader(
            TokenShards(self.folder, "train"), self.seq_len, micro_batch_size, self.seed, rank
        )

    def loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = self.split_batch(batch)
        chunk = self.config.train.loss_chunk if self.config.train is not None else None
        if chunk is not None:
            return lm_loss_chunked(model, inputs, targets, chunk), {}
        return self.output_loss(model(inputs), targets), {}

    def split_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        return inputs, targets

    def output_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-token cross entropy in float32 (what a pipeline's last stage computes, too)."""
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def evaluate(self, model: nn.Module, micro_batch_size: int, batches: int = 8) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and next-token accuracy on fixed windows."""
        if self._val is None or self._val.batch_size != micro_batch_size:
            self._val = WindowLoader(
                TokenShards(self.folder, "val"), self.seq_len, micro_batch_size, self.seed
            )
        device = next(model.parameters()).device
        total_loss = torch.zeros((), dtype=torch.float64)
        correct = 0
        count = 0
        for inputs, targets in self._val.fixed_batches(batches):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs).float()
            total_loss += (
                F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double().cpu()
            )
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
        val_loss = float(total_loss / count)
        return {
            "val_loss": val_loss,
            "val_perplexity": float(torch.tensor(val_loss).exp()),
            "val_accuracy": correct / count,
        }

    def count_units(self, batch: Any) -> int:
        return int(batch[0].numel())

    def tokenizer_file(self) -> Path | None:
        path = self.folder / TOKENIZER
        return path if path.exists() else None

    def unigram_baseline(self) -> float:
        """Entropy (nats/token) of the validation tokens' own unigram distribution."""
        return float(self.meta["val_unigram_entropy"])
