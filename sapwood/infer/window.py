"""Streaming past the maximum context with bounded memory: a sliding window with attention sinks
(Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks", StreamingLLM).

The cache keeps the keys and values of the first ``sinks`` tokens (the attention sinks) and of the most
recent ``window`` tokens: at most ``sinks + window`` positions, whatever the stream's length.
Positions are positions *in the cache*, as StreamingLLM assigns them: a new token's position is the
cache length (at most ``sinks + window - 1``), so rotary positions never pass ``sinks + window`` and a
model trained at that length keeps working. When the cache is full the oldest window token is dropped
and every remaining window key is rotated back by one position (RoPE rotations compose:
``R(p - 1) = R(-1) R(p)``; the stored keys keep their attention factor), so they sit at the positions a
fresh forward over the kept tokens would give them in the first layer.

:class:`SinkWindowCache` implements ``KVCacheLike`` for one sequence; :func:`stream_logits` runs a Decoder
over a token stream through it one token at a time and returns the next-token logits of every position;
:func:`streaming_nll` the per-token negative log-likelihood (perplexity of window vs full attention).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sapwood.errors import SapwoodError
from sapwood.model.rope import apply_rope, rope_cos_sin


class SinkWindowCache:
    """KV cache of ``sinks`` first tokens + the most recent ones, ``sinks + window`` positions at most."""

    def __init__(self, layers: int, sinks: int, window: int, inv_freq: torch.Tensor):
        if sinks < 0 or window < 1:
            raise SapwoodError(
                f"attention sinks={sinks} and window={window}: need sinks >= 0 and window >= 1"
            )
        self.sinks, self.window = sinks, window
        self.capacity = sinks + window
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0
        cos, sin = rope_cos_sin(torch.tensor([[-1]]), inv_freq)  # rotate back by one position
        self._back = (cos.to(inv_freq.device), sin.to(inv_freq.device))

    def next_position(self) -> int:
        """Make room for one token (evicting the oldest window token when full); its position."""
        if self.length == self.capacity:
            cos, sin = self._back
            for store in (self.keys, self.values):
                for i, tensor in enumerate(store):
                    kept = tensor[:, :, self.sinks + 1 :]
                    if store is self.keys:
                        kept = apply_rope(kept, cos, sin)
                    store[i] = torch.cat((tensor[:, :, : self.sinks], kept), dim=2)
            self.length -= 1
        return self.length

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor):
        """Append ``k``, ``v`` ``[1, kv_heads, seq, head_dim]``; a chunk of several tokens after cached ones
        gets the causal mask aligned to the end (each new token sees the cache and the chunk up to itself)."""
        if self.keys[layer_index] is None:
            self.keys[layer_index], self.values[layer_index] = k, v
        else:
            self.keys[layer_index] = torch.cat((self.keys[layer_index], k), dim=2)
            self.values[layer_index] = torch.cat((self.values[layer_index], v), dim=2)
        keys, seq = self.keys[layer_index].shape[2], k.shape[2]
        if layer_index == len(self.keys) - 1:
            self.length = keys
        mask = None
        if 1 < seq < keys:
            mask = torch.ones(seq, keys, dtype=torch.bool, device=k.device).tril(keys - seq)
        return self.keys[layer_index], self.values[layer_index], mask


def _stream(model: nn.Module, tokens: torch.Tensor, sinks: int, window: int) -> Iterator[torch.Tensor]:
    """Next-token logits ``[vocab]`` after each token of ``tokens`` (``[seq]``), one forward per token."""
    cache = SinkWindowCache(len(model.layers), sinks, window, model.inv_freq)
    for token in tokens.tolist():
        position = cache.next_position()
        logits = model(
            torch.tensor([[token]], device=model.inv_freq.device),
            positions=torch.tensor([[position]], device=model.inv_freq.device),
            kv_cache=cache,
        )
        yield logits[0, -1]


@torch.inference_mode()
def stream_logits(model: nn.Module, tokens: torch.Tensor, sinks: int = 4, window: int = 256) -> torch.Tensor:
    """``[seq, vocab]`` next-token logits of ``model`` streaming ``tokens`` with sinks + a window."""
    return torch.stack(list(_stream(model, tokens, sinks, window)))


@torch.inference_mode()
def streaming_nll(model: nn.Module, tokens: torch.Tensor, sinks: int = 4, window: int = 256) -> torch.Tensor:
    """Negative log-likelihood (nats) of ``tokens[1:]`` streamed with sinks + a window, per token."""
    logits = stream_logits(model, tokens[:-1], sinks, window)
    return F.cross_entropy(logits.float(), tokens[1:], reduction="none")
