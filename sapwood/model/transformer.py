"""The decoder: token embedding, RMSNorm, rotary GQA attention through SDPA, SwiGLU, tied or untied head.

The Hugging Face families are options of :class:`ModelConfig`, not other classes: biases on q/k/v
(Qwen2), on the attention output and the FFN (Llama ``attention_bias`` / ``mlp_bias``), per-head q/k
RMSNorm (Qwen3), the gated FFN's activation, a sliding attention window (Mistral v0.1, Phi-3 4k) and
the RoPE scaling (``sapwood.model.rope``).

Plain PyTorch, no parallelism inside (see ``sapwood.train.parallel``). Module names follow torchtitan
(``tok_embeddings``, ``layers.N.attention.wq`` ...) so tensor-parallel plans and checkpoints map directly.
``layers`` is a ModuleDict keyed by layer index so a pipeline stage can drop layers and keep names;
a stage without ``tok_embeddings`` takes hidden states, one without ``output`` returns them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sapwood.config import ModelConfig
from sapwood.errors import SapwoodError
from sapwood.model.rope import apply_rope, rope_cos_sin, scaled_inv_freq

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class KVCacheLike(Protocol):
    """What attention needs from a KV cache (implemented in ``sapwood.infer``)."""

    def update(
        self, layer_index: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this step's k/v ``[batch, kv_heads, seq, head_dim]`` and return all keys, values and an
        attention mask (bool, True = attend, broadcastable to ``[batch, heads, seq, keys]``), or None
        for plain causal attention over what is returned."""
        ...


class RMSNorm(nn.Module):
    """Root-mean-square norm, always computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# Attention kernels that never hold the s x s score matrix (output + log-sum-exp rows only).
FUSED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
# From this many query positions on, CUDA attention must run a fused kernel: the math kernel's score
# matrix (batch x heads x s x s) would cost more memory than the rest of a layer.
FUSED_ATTENTION_MIN_SEQ = 1024
SDPA_KERNEL_NAMES = {SDPBackend.MATH: "math", SDPBackend.FLASH_ATTENTION: "flash",
                     SDPBackend.EFFICIENT_ATTENTION: "memory_efficient", SDPBackend.CUDNN_ATTENTION: "cudnn"}


class AttentionKernelError(SapwoodError):
    """Only the math attention kernel (a materialized s x s score matrix) could run at a long sequence."""


def needs_fused_attention(query: torch.Tensor) -> bool:
    """True for CUDA attention over at least :data:`FUSED_ATTENTION_MIN_SEQ` query positions."""
    return query.is_cuda and query.shape[-2] >= FUSED_ATTENTION_MIN_SEQ


def sdpa_kernel_choice(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = True) -> str:
    """The kernel ``scaled_dot_product_attention`` dispatches these inputs to under the backends
    enabled now: ``flash``, ``memory_efficient``, ``cudnn`` or ``math`` (no kernel is run)."""
    if key.shape[1] != query.shape[1]:  # the choice for grouped-query attention: heads repeated
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    choice = torch._fused_sdp_choice(query, key, value, attn_mask, 0.0, is_causal and attn_mask is None)
    return SDPA_KERNEL_NAMES.get(SDPBackend(choice), str(choice))


def attention_kernel(cfg: ModelConfig, seq: int, dtype: torch.dtype, device: torch.device | str,
                     fused_only: bool = False) -> str:
    """The kernel a training forward of ``cfg`` at ``seq`` tokens would use on ``device`` (causal,
    no mask). ``fused_only``: as :class:`Attention` restricts CUDA attention at long sequences."""
    device = torch.device(device)
    q = torch.empty(1, cfg.heads, seq, cfg.head_dim, dtype=dtype, device=device, requires_grad=True)
    kv = torch.empty(1, cfg.kv_heads, seq, cfg.head_dim, dtype=dtype, device=device, requires_grad=True)
    restriction = sdpa_kernel(FUSED_SDPA_BACKENDS) if fused_only else contextlib.nullcontext()
    with restriction:
        try:
            return sdpa_kernel_choice(q, kv, kv)
        except RuntimeError:  # no kernel among the enabled ones accepts these inputs
            return "none"


def check_fused_attention(cfg: ModelConfig, seq: int, dtype: torch.dtype, device: torch.device | str) -> str:
    """The fused kernel attention will use, or a one-line :class:`AttentionKernelError` when on this
    device only the math kernel accepts ``cfg``'s heads at ``seq`` tokens in ``dtype``."""
    kernel = attention_kernel(cfg, seq, dtype, device)
    if kernel in ("math", "none"):
        score_gb = cfg.heads * seq * seq * torch.empty((), dtype=dtype).element_size() / 1e9
        where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)
        raise AttentionKernelError(
            f"attention at seq {seq} on {where} ({str(dtype).removeprefix('torch.')}, head_dim "
            f"{cfg.head_dim}, "
            f"{cfg.heads} heads) would run only the math kernel ({score_gb:.1f} GB of scores per sequence "
            f"and layer); "
            "flash / memory-efficient attention need bf16 or fp16 and head_dim <= 256 (a multiple of 8)"
        )
    return kernel


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings; kernels chosen by scaled_dot_product_attention.
    With ``qk_norm`` each query and key head is RMS-normalized over head_dim before the rotation; with
    ``sliding_window`` a query sees only the last ``sliding_window`` visible keys (itself included)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=cfg.attention_out_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.sliding_window = cfg.sliding_window
        self.context_parallel = None  # set by sapwood.train.context_parallel: ring attention over cp ranks

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCacheLike | None = None,
        layer_index: int = 0, causal: bool = True,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallel each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if kv_cache is not None:
            k, v, mask = kv_cache.update(layer_index, k, v)
        if self.context_parallel is not None and mask is None and causal:
            out = self.context_parallel.attention(q, k, v, self.sliding_window)
            return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
        keys = k.shape[2]
        if self.sliding_window is not None and keys > self.sliding_window and causal:
            if mask is None:  # causal, the queries being the last ``seq`` of the ``keys`` positions
                mask = torch.ones(seq, keys, dtype=torch.bool, device=x.device).tril(keys - seq)
            # keep a visible key only if at most sliding_window visible keys lie at or after it
            mask = mask & (mask.flip(-1).cumsum(-1).flip(-1) <= self.sliding_window)
        # On CUDA at long sequence only the fused kernels may run (no kernel: an error, never math).
        kernels = sdpa_kernel(FUSED_SDPA_BACKENDS) if needs_fused_attention(q) else contextlib.nullcontext()
        with kernels:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None and seq > 1,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """Gated FFN: w2(act(w1 x) * w3 x); SwiGLU with the default silu, GeGLU with gelu."""

    def __init__(self, hidden: int, ffn: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=bias)  # gate
        self.w3 = nn.Linear(hidden, ffn, bias=bias)  # up
        self.w2 = nn.Linear(ffn, hidden, bias=bias)  # down
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


def residual_std(cfg: ModelConfig) -> float:
    """Init std of the projections that write into the residual stream: init_std / sqrt(2 * layers)."""
    return cfg.init_std / math.sqrt(2 * cfg.layers)


def tie_head(model: nn.Module) -> None:
    """Share the embedding matrix with the output head when ``model.cfg`` ties them and both exist
    (after ``to_empty``, growth or tensor-parallel sharding, which replace the parameters)."""
    tied = getattr(getattr(model, "cfg", None), "tied_embeddings", False)
    embeddings, output = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    if tied and embeddings is not None and output is not None:
        output.weight = embeddings.weight


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.hidden, cfg.ffn, cfg.mlp_bias, cfg.activation)

    def init_weights(self, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) input projections, :func:`residual_std` output projections (``wo``,
        ``w2``), zero biases, unit norm gains; ``cfg`` is the shape of the model the block belongs to."""
        with torch.no_grad():
            for linear in (self.attention.wq, self.attention.wk, self.attention.wv,
                           self.feed_forward.w1, self.feed_forward.w3):
                nn.init.normal_(linear.weight, 0.0, cfg.init_std, generator=generator)
            for linear in (self.attention.wo, self.feed_forward.w2):
                nn.init.normal_(linear.weight, 0.0, residual_std(cfg), generator=generator)
            self.reset_option_parameters()
            self.attention_norm.reset_parameters()
            self.ffn_norm.reset_parameters()

    def reset_option_parameters(self) -> None:
        """Zero the family options' biases and reset the q/k norm gains (weights are initialized
        elsewhere)."""
        for module in (*self.attention.children(), *self.feed_forward.children()):
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def forward(self, x, cos, sin, kv_cache=None, layer_index: int = 0, causal: bool = True):
        x = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, layer_index, causal)
        return x + self.feed_forward(self.ffn_norm(x))


class Decoder(nn.Module):
    """Decoder-only language model: ``model(tokens)`` -> logits ``[batch, seq, vocab]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        tie_head(self)
        inv_freq, self.attention_factor = scaled_inv_freq(
            cfg.head_dim, cfg.rope_theta, cfg.trained_context, cfg.rope_scaling
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * layers).

        Also recomputes the rope buffer, so a model built on the meta device can be materialized with
        ``to_empty`` and then initialized.
        """
        std = self.cfg.init_std
        with torch.no_grad():
            inv_freq, _ = scaled_inv_freq(
                self.cfg.head_dim, self.cfg.rope_theta, self.cfg.trained_context, self.cfg.rope_scaling
            )
            self.inv_freq.copy_(inv_freq)
            if self.tok_embeddings is not None:
                nn.init.normal_(self.tok_embeddings.weight, 0.0, std, generator=generator)
            for block in self.layers.values():
                block.init_weights(self.cfg, generator)
            if self.norm is not None:
                self.norm.reset_parameters()
            if self.output is not None and not self.cfg.tied_embeddings:
                nn.init.normal_(self.output.weight, 0.0, std, generator=generator)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tokens``: LongTensor ``[batch, seq]`` (or hidden states for a pipeline stage without
        embeddings). ``positions``: ``[batch or 1, seq]``, default ``0..seq-1``; required with a cache
        that already holds tokens. ``rope``: precomputed ``(cos, sin)`` ``[batch or 1, seq, head_dim]``
        instead of the model's own (per-request rotary scaling). ``logits_at``: LongTensor ``[n]`` of
        flat indices into ``batch * seq``; the norm and head then run only there and the result is
        ``[n, vocab]``."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        seq = h.shape[1]
        if rope is None:
            if positions is None:
                positions = torch.arange(seq, device=h.device).unsqueeze(0)
            cfg, inv_freq, attention_factor = self.cfg, self.inv_freq, self.attention_factor
            if (
                cfg.rope_scaling.type == "longrope" and int(positions.max()) >= cfg.trained_context
            ):  # long factors
                inv_freq, attention_factor = scaled_inv_freq(
                    cfg.head_dim, cfg.rope_theta, cfg.trained_context, cfg.rope_scaling,
                    seq_len=int(positions.max()) + 1,
                )
            rope = rope_cos_sin(positions, inv_freq, attention_factor)
        cos, sin = rope
        for name, block in self.layers.items():
            h = block(h, cos, sin, kv_cache, int(name))
        if logits_at is not None:
            h = h.flatten(0, 1)[logits_at]
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h
