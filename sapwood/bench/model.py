"""``sapwood bench model``: forward+backward tokens/s of the sapwood Decoder against a plain reference.

The reference is the same math written the obvious way, inside this file: embedding lookup, RMSNorm
in fp32, rotate-half RoPE, attention as ``softmax(q k^T / sqrt(d) + causal mask) v`` with the kv heads
``repeat_interleave``-d for GQA, SwiGLU, the head. It holds its own copy of the sapwood model's weights
(same shapes and dtype), and before timing the bench checks both give the same logits, so the ratio
compares two implementations of one function. The difference the ratio shows is mostly
``scaled_dot_product_attention`` (fused kernels, no materialized ``s x s`` matrix, no kv copies).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from sapwood.bench.harness import Result, Timing, time_fn, write_suite
from sapwood.config import load_config
from sapwood.errors import ConfigError
from sapwood.model.transformer import Decoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReferenceDecoder:
    """The Decoder's function in plain tensor code, on leaf tensors copied from ``model``."""

    def __init__(self, model: Decoder):
        self.cfg = model.cfg
        self.weights = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
        self.inv_freq = model.inv_freq.detach().clone()
        self.attention_factor = model.attention_factor

    def parameters(self) -> list[torch.Tensor]:
        return list(self.weights.values())

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps) * weight.float()).to(
            x.dtype
        )

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + rotated * sin).to(x.dtype)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg, w = self.cfg, self.weights
        batch, seq = tokens.shape
        h = w["tok_embeddings.weight"][tokens]
        angles = torch.arange(seq, device=tokens.device, dtype=torch.float32)[:, None] * self.inv_freq.to(
            tokens.device
        )
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        causal = torch.full((seq, seq), float("-inf"), device=tokens.device).triu(1)
        for i in range(cfg.layers):
            p = f"layers.{i}."
            x = self._rms_norm(h, w[p + "attention_norm.weight"])
            q = (x @ w[p + "attention.wq.weight"].T).view(batch, seq, cfg.heads, cfg.head_dim).transpose(1, 2)
            k = (
                (x @ w[p + "attention.wk.weight"].T)
                .view(batch, seq, cfg.kv_heads, cfg.head_dim)
                .transpose(1, 2)
            )
            v = (
                (x @ w[p + "attention.wv.weight"].T)
                .view(batch, seq, cfg.kv_heads, cfg.head_dim)
                .transpose(1, 2)
            )
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            k = k.repeat_interleave(cfg.kv_groups, dim=1)
            v = v.repeat_interleave(cfg.kv_groups, dim=1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim) + causal.to(q.dtype)
            attn = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
            h = h + attn.transpose(1, 2).reshape(batch, seq, -1) @ w[p + "attention.wo.weight"].T
            x = self._rms_norm(h, w[p + "ffn_norm.weight"])
            gate = F.silu(x @ w[p + "feed_forward.w1.weight"].T)
            h = h + (gate * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
        h = self._rms_norm(h, w["norm.weight"])
        head = w["tok_embeddings.weight"] if cfg.tied_embeddings else w["output.weight"]
        return h @ head.T


def train_step(forward, params: list[torch.Tensor], tokens: torch.Tensor) -> None:
    """One forward + backward with a next-token cross-entropy loss; gradients are dropped after."""
    logits = forward(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for p in params:
        p.grad = None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is not supported; allowed: auto, cpu, cuda")
    return torch.device(device)


def time_interleaved(ours: Callable[[], object], baseline: Callable[[], object], repeats: int,
                     device: str) -> tuple[Timing, Timing]:
    """Time both alternately, one call each per round after one warm-up call each, so a change in
    machine load during the run affects both sides alike."""
    samples: tuple[list[float], list[float]] = ([], [])
    for fn in (ours, baseline):
        fn()  # warm-up
    for _ in range(repeats):
        for fn, out in ((ours, samples[0]), (baseline, samples[1])):
            out.append(time_fn(fn, warmup=0, repeats=1, device=device).median)
    def summary(x: list[float]) -> Timing:
        return Timing(statistics.median(x), min(x), max(x), statistics.stdev(x) if len(x) > 1 else 0.0, x)

    return summary(samples[0]), summary(samples[1])


def run_model_bench(
    out: str | Path, preset: str = "tiny", batch: int = 4, seq: int = 128, dtype: str = "float32",
    device: str = "auto", repeats: int = 5, threads: int | None = None,
) -> tuple[list[Result], Path]:
    """Time both implementations (forward+backward, and forward only) and write ``OUT/model.json``.

    ``threads`` sets torch's CPU intra-op threads (on a shared, oversubscribed CPU one thread gives
    far steadier timings than several spinning OpenMP threads)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    for name, value in (("batch", batch), ("seq", seq), ("repeats", repeats)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads={threads} must be at least 1")
        torch.set_num_threads(threads)
    torch_device, torch_dtype = pick_device(device), DTYPES[dtype]
    config = load_config(preset)
    torch.manual_seed(0)
    with torch.device(torch_device):
        model = Decoder(config.model).to(torch_dtype)
    reference = ReferenceDecoder(model)
    tokens = torch.randint(0, config.model.vocab_size, (batch, seq + 1), device=torch_device)
    with torch.no_grad():
        max_diff = (model(tokens) - reference(tokens)).float().abs().max().item()
    tolerance = 1e-3 if torch_dtype == torch.float32 else 0.1
    if not max_diff < tolerance:
        raise RuntimeError(
            f"reference and Decoder disagree (max |diff| {max_diff:.3g}); the bench would be invalid"
        )
    ours_params = list(model.parameters())
    dev = str(torch_device)
    timings = {
        "fwd+bwd": time_interleaved(
            lambda: train_step(model, ours_params, tokens),
            lambda: train_step(reference, reference.parameters(), tokens), repeats, dev,
        )
    }
    with torch.no_grad():
        timings["forward"] = time_interleaved(
            lambda: model(tokens[:, :-1]), lambda: reference(tokens[:, :-1]), repeats, dev
        )
    tokens_per_step = batch * seq
    params = {"preset": preset, "batch": batch, "seq": seq, "dtype": dtype, "device": str(torch_device),
              "repeats": repeats, "threads": torch.get_num_threads(), "logits_max_abs_diff": max_diff}
    results = []
    for kind, (ours, ref) in timings.items():
        results.append(
            Result(
                name=f"{kind} {config.name} b{batch} s{seq} {dtype}",
                value=tokens_per_step / ours.median,
                unit="tokens/s",
                baseline_value=tokens_per_step / ref.median,
                params={
                    **params, "ours_s": ours.median, "ours_stdev_s": ours.stdev, "baseline_s": ref.median,
                    "baseline_stdev_s": ref.stdev,
                },
                baseline="plain PyTorch reference (materialized softmax attention, repeat_interleave GQA)",
            )
        )
    return results, write_suite("model", results, out)
