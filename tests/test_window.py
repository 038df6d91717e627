"""Streaming with attention sinks + a sliding window (StreamingLLM): bounded memory past the maximum context,
exactly full attention while the stream fits, and exactly a fresh forward over the kept tokens after
evictions (one layer, where the cached keys depend only on token and position)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sapwood.config import ModelConfig
from sapwood.errors import SapwoodError
from sapwood.infer.window import SinkWindowCache, stream_logits, streaming_nll
from sapwood.model.transformer import Decoder


def model(layers: int) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50, hidden=32, layers=layers, heads=4, kv_heads=2, ffn=64, trained_context=16,
        rope_theta=100.0,
    )
    return Decoder(cfg).eval()


def test_cache_never_holds_more_than_sinks_plus_window():
    decoder = model(2)
    cache = SinkWindowCache(2, sinks=2, window=6, inv_freq=decoder.inv_freq)
    tokens = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(1))
    seen = []
    with torch.inference_mode():
        for token in tokens.tolist():
            position = cache.next_position()
            assert position < 8
            decoder(torch.tensor([[token]]), positions=torch.tensor([[position]]), kv_cache=cache)
            seen.append(cache.keys[0].shape[2])
    assert max(seen) == 8 and seen[-1] == 8 and cache.values[1].shape[2] == 8


def test_streaming_equals_full_attention_while_the_stream_fits():
    decoder = model(3)
    tokens = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = F.cross_entropy(decoder(tokens[None, :-1])[0], tokens[1:], reduction="none")
    assert torch.allclose(streaming_nll(decoder, tokens, sinks=4, window=8), full, atol=1e-5)


def test_after_evictions_the_window_is_a_fresh_forward_over_sinks_and_recent_tokens():
    decoder = model(1)
    sinks, window = 3, 5
    tokens = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(3))
    streamed = stream_logits(decoder, tokens, sinks, window)
    with torch.inference_mode():
        for t in range(sinks + window, len(tokens)):
            kept = torch.cat((tokens[:sinks], tokens[t - window + 1 : t + 1]))
            fresh = decoder(kept[None])[0, -1]
            assert torch.allclose(streamed[t], fresh, atol=1e-5), t


def test_bad_window_is_one_line_error():
    with pytest.raises(
        SapwoodError, match=r"attention sinks=-1 and window=0: need sinks >= 0 and window >= 1"
    ):
        SinkWindowCache(1, -1, 0, torch.ones(4))


def test_a_chunk_after_cached_tokens_is_causal_from_the_end():
    """Feeding 5 tokens, then a chunk of 4, equals one forward over all 9 (no eviction)."""
    decoder = model(2)
    tokens = torch.randint(0, 50, (9,), generator=torch.Generator().manual_seed(4))
    cache = SinkWindowCache(2, sinks=2, window=10, inv_freq=decoder.inv_freq)
    with torch.inference_mode():
        decoder(tokens[None, :5], positions=torch.arange(5)[None], kv_cache=cache)
        chunk = decoder(tokens[None, 5:], positions=torch.arange(5, 9)[None], kv_cache=cache)[0]
        full = decoder(tokens[None])[0, 5:]
    assert cache.length == 9 and torch.allclose(chunk, full, atol=1e-5)
