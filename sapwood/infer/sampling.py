"""Per-request sampling parameters and one batched sampler for a step of many requests.

Every row of a decode batch has its own temperature, top-k, top-p, repetition penalty and random
generator; the filtering is vectorized over the batch, only the uniform draw is per row (so a seeded
request draws the same numbers whatever else is in the batch).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sapwood.errors import SapwoodError

GREEDY_BELOW = 1e-5  # temperatures below this are argmax (1e-300 would be 0 in float32: NaN probabilities)
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    """How one request chooses its tokens. ``temperature < GREEDY_BELOW`` or ``greedy`` means argmax.

    ``logprobs``: report the chosen token's log-probability and the top ``logprobs`` alternatives for
    every generated token (None = off); ``prompt_logprobs``: also for every prompt token (``echo``), in
    which case ``max_tokens`` may be 0. Log-probabilities are the model's log-softmax, before temperature,
    penalties and ``logit_bias``. ``logit_bias``: token id -> value added to its logit (-100..100).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    greedy: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stop_shown = repr(self.stop) if len(repr(self.stop)) < 80 else f"{len(self.stop)} strings"
        checks = [
            (
                self.max_tokens >= (0 if self.prompt_logprobs else 1),
                f"max_tokens={self.max_tokens}: must be >= 1 (0 only with echo/prompt logprobs)",
            ),
            (
                math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0,
                f"temperature={self.temperature}: must be in [0, 2]",
            ),
            (self.top_k >= 0, f"top_k={self.top_k}: must be >= 0 (0 = off)"),
            (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p={self.top_p}: must be in (0, 1]"),
            (
                math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
                f"repetition_penalty={self.repetition_penalty}: must be in (0, 10]",
            ),
            (
                self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                f"seed={self.seed}: must be an integer in [-2**63, 2**64 - 1]",
            ),
            (
                len(self.stop) <= MAX_STOP_STRINGS
                and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
                f"stop={stop_shown}: at most {MAX_STOP_STRINGS} non-empty strings of at most "
                f"{MAX_STOP_CHARS} characters",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs={self.logprobs}: must be in 0..{MAX_LOGPROBS}",
            ),
            (
                len(self.logit_bias) <= MAX_LOGIT_BIAS,
                f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SapwoodError(message)
        for token, bias in self.logit_bias.items():
            if not (
                isinstance(token, int) and token >= 0 and math.isfinite(bias) and -100.0 <= bias <= 100.0
            ):
                raise SapwoodError(
                    f"logit_bias {{{token!r}: {bias!r}}}: keys are token ids >= 0, values in [-100, 100]"
                )

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature < GREEDY_BELOW

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
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
    seen: torch.Tensor | None = None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of every row: ``logits`` ``[batch, vocab]`` (any float dtype) -> LongTensor ``[batch]``.

    ``seen`` (bool ``[batch, vocab]``) marks the tokens of each row's prompt and output, for the
    repetition penalty; ``bias`` (``[batch, vocab]``) is added to the logits (``logit_bias``).
    """
    logits = logits.float()
    device = logits.device
    if bias is not None:
        logits = logits + bias
    if seen is not None:
        penalties = torch.tensor([p.repetition_penalty for p in params], device=device)
        logits = apply_repetition_penalty(logits, seen, penalties)
    argmax = logits.argmax(dim=-1)
    if all(p.is_greedy for p in params):
        return argmax
    greedy = torch.tensor([p.is_greedy for p in params], device=device)
    temperature = torch.tensor([p.temperature if not p.is_greedy else 1.0 for p in params], device=device)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    filtered = filter_top_k_top_p(logits / temperature[:, None], top_k, top_p)
    cdf = filtered.softmax(dim=-1).cumsum(dim=-1)
    uniform = torch.stack(
        [torch.rand((), generator=g) if g is not None else torch.zeros(()) for g in generators]
    ).to(device)
    uniform = uniform * cdf[:, -1]
    sampled = torch.searchsorted(cdf, uniform[:, None], right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)
    return torch.where(greedy, argmax, sampled)


TokenLogprobs = tuple[float, list[tuple[int, float]]]


def token_logprobs(logits: torch.Tensor, chosen: list[int], top: int) -> list[TokenLogprobs]:
    """Log-softmax of ``logits`` ``[n, vocab]``: each row's ``chosen`` token and its ``top`` best
    ``[(token id, logprob)]`` (the model's own distribution: before temperature, penalties and bias)."""
    if not chosen:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, torch.tensor(chosen, device=logprobs.device)[:, None])[:, 0].tolist()
    if top:
        values, indices = logprobs.topk(top, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in chosen]
    return list(zip(picked, tops, strict=True))
