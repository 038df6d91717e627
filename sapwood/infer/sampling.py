"""Per-request sampling parameters and one batched sampler for a step of many requests.

Every row of a decode batch has its own temperature, top-k, top-p, repetition penalty and random
generator; the filtering is vectorized over the batch, only the uniform draw is per row (so a seeded
request draws the same numbers whatever else is in the batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sapwood.errors import SapwoodError


@dataclass
class SamplingParams:
    """How one request chooses its tokens. ``temperature == 0`` or ``greedy`` means argmax."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    greedy: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, f"max_tokens={self.max_tokens}: must be >= 1"),
            (0.0 <= self.temperature <= 2.0, f"temperature={self.temperature}: must be in [0, 2]"),
            (self.top_k >= 0, f"top_k={self.top_k}: must be >= 0 (0 = off)"),
            (0.0 < self.top_p <= 1.0, f"top_p={self.top_p}: must be in (0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, f"repetition_penalty={self.repetition_penalty}: must be in (0, 10]"),
            (len(self.stop) <= 4 and all(isinstance(s, str) and s for s in self.stop),
             f"stop={self.stop!r}: at most 4 non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise SapwoodError(message)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    def make_generator(self) -> torch.Generator | None:
        if self.is_greedy:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


GENERATION_CONFIG_SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty")


def generation_config_defaults(folder: str | Path) -> dict[str, float | int]:
    """The sampling defaults in a checkpoint's ``generation_config.json`` (temperature, top_p, top_k,
    repetition_penalty): what a request that leaves those fields unset gets, as vLLM does. Validated here,
    so a bad file is named at load time, not blamed on a request."""
    path = Path(folder) / "generation_config.json"
    if not path.exists():
        return {}
    config = json.loads(path.read_text())
    defaults = {k: config[k] for k in GENERATION_CONFIG_SAMPLING if isinstance(config.get(k), int | float)}
    try:
        SamplingParams(**defaults)
    except SapwoodError as exc:
        raise SapwoodError(f"{path}: {exc}") from None
    return defaults


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalties: torch.Tensor
) -> torch.Tensor:
    """CTRL-style penalty (as in transformers): seen tokens' positive logits divided, negative multiplied.

    ``seen``: bool ``[batch, vocab]``; ``penalties``: ``[batch]``.
    """
    penalty = penalties[:, None].expand_as(logits)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k and nucleus (top-p); ``top_k == 0`` is off."""
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    drop = ranks >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]  # the first token is always kept (mass_before = 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_index, sorted_logits)


def sample_next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of every row: ``logits`` ``[batch, vocab]`` (any float dtype) -> LongTensor ``[batch]``.

    ``seen`` (bool ``[batch, vocab]``) marks the tokens of each row's prompt and output, for the
    repetition penalty.
    """
    logits = logits.float()
    device = logits.device
    penalties = torch.tensor([p.repetition_penalty for p in params], device=device)
    if seen is not None and bool((penalties != 1.0).any()):
        logits = apply_repetition_penalty(logits, seen, penalties)
    greedy = torch.tensor([p.is_greedy for p in params], device=device)
    argmax = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return argmax
    temperature = torch.tensor([p.temperature if not p.is_greedy else 1.0 for p in params], device=device)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    filtered = filter_top_k_top_p(logits / temperature[:, None], top_k, top_p)
    cdf = filtered.softmax(dim=-1).cumsum(dim=-1)
    uniform = torch.stack([
        torch.rand((), generator=g) if g is not None else torch.zeros(()) for g in generators
    ]).to(device)
    uniform = uniform * cdf[:, -1]
    sampled = torch.searchsorted(cdf, uniform[:, None], right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)
    return torch.where(greedy, argmax, sampled)
