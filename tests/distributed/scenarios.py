"""Shared pieces of the distributed tests: a tiny model, fixed batches, a reference single-process run,
and the scenarios run under torchrun by ``worker.py``. Imported by the test file and by the worker."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sapwood.config import ModelConfig, ParallelConfig

SEED = 1234
BATCH = 8
SEQ = 16
LR = 3e-3
GRAD_CLIP = 1.0


def tiny_model_config(tied: bool) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden=32, layers=4, heads=4, kv_heads=2, ffn=64, trained_context=SEQ,
                       tied_embeddings=tied)


def build_model(tied: bool) -> torch.nn.Module:
    from sapwood.model.transformer import Decoder

    torch.manual_seed(SEED)
    return Decoder(tiny_model_config(tied))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch ``step``: inputs and next-token targets, the same on every rank."""
    gen = torch.Generator().manual_seed(SEED + step)
    tokens = torch.randint(0, 64, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(params) -> torch.optim.Optimizer:
    # foreach=False: the per-tensor path is the same arithmetic for plain tensors and DTensor shards.
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1, foreach=False)


def reference_losses(tied: bool, steps: int) -> list[float]:
    """The same training on one process, no parallelism: the numbers every layout must reproduce."""
    model = build_model(tied)
    optimizer = make_optimizer(model.parameters())
    losses = []
    for step in range(steps):
        inputs, targets = batch(step)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# name -> (world size, parallel config, tied embeddings)
SCENARIOS: dict[str, tuple[int, ParallelConfig, bool]] = {
    "single_tied": (1, ParallelConfig(), True), "single_untied": (1, ParallelConfig(), False),
    "fsdp2": (2, ParallelConfig(dp_shard=2), True),
    "hsdp_replicate2": (2, ParallelConfig(dp_replicate=2), False), "tp2": (2, ParallelConfig(tp=2), True),
    "pp2_1f1b": (2, ParallelConfig(pp=2, pp_microbatches=2), False),
    "pp2_gpipe": (2, ParallelConfig(pp=2, pp_schedule="gpipe", pp_microbatches=4), False),
    "pp2_interleaved": (2, ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", pp_microbatches=2), False),
    "fsdp2_tp2": (4, ParallelConfig(dp_shard=2, tp=2), True),
    "pp2_fsdp2": (4, ParallelConfig(pp=2, dp_shard=2, pp_microbatches=2), False),
    "pp2_tp2": (4, ParallelConfig(pp=2, tp=2, pp_microbatches=2), False),
}
