"""Text data: BPE tokenizer, packed memory-mapped shards, deterministic split and window loader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from sapwood.data.text import (
    EOS,
    TokenShards,
    WindowLoader,
    stdlib_corpus,
    token_dtype,
    tokenize_corpus,
    unigram_entropy,
)
from sapwood.errors import SapwoodError


def test_stdlib_corpus_is_bounded_and_deterministic():
    files = stdlib_corpus(max_files=24)
    assert len(files) == 24
    assert files == stdlib_corpus(max_files=24)
    assert all(f.suffix == ".py" and f.exists() for f in files)
    assert len(stdlib_corpus(max_files=None)) > 24


def test_shards_hold_every_document_losslessly(tokens_dir, corpus_files):
    meta = json.loads((tokens_dir / "meta.json").read_text())
    tokenizer = Tokenizer.from_file(str(tokens_dir / "tokenizer.json"))
    assert meta["vocab_size"] == tokenizer.get_vocab_size() <= 320
    assert meta["dtype"] == "uint16"
    assert meta["eos_id"] == tokenizer.token_to_id(EOS) == 0
    texts = {f.read_text(encoding="utf-8", errors="replace") for f in corpus_files}
    texts = {t for t in texts if t.strip()}
    decoded = set()
    for split in ("train", "val"):
        for entry in meta["shards"][split]:
            tokens = np.fromfile(tokens_dir / entry["file"], dtype=np.uint16)
            starts = np.load(tokens_dir / entry["file"].replace(".bin", ".docs.npy"))
            assert len(starts) == entry["documents"] and tokens.size == entry["tokens"]
            ends = np.append(starts[1:], tokens.size) - 1
            assert (tokens[ends] == meta["eos_id"]).all()  # every document ends with eos
            for start, end in zip(starts, ends, strict=True):
                decoded.add(tokenizer.decode(tokens[start:end].tolist()))
    assert decoded == texts  # byte-level BPE round-trips every document, each in exactly one split
    assert meta["train_documents"] + meta["val_documents"] == len(texts)
    assert meta["val_documents"] >= 1 and meta["train_documents"] >= 1


def test_tokenizing_twice_gives_identical_shards_and_split(
    tmp_path, corpus_files, tokens_dir, tokens_settings
):
    tokenize_corpus(corpus_files, tmp_path, **tokens_settings)
    for name in ("meta.json", "train_00000.bin", "val_00000.bin"):
        assert (tmp_path / name).read_bytes() == (tokens_dir / name).read_bytes()


def test_small_shards_keep_documents_whole(tmp_path, corpus_files):
    meta = tokenize_corpus(corpus_files[:8], tmp_path, vocab_size=300, val_fraction=0.2, shard_tokens=5000)
    train = meta["shards"]["train"]
    assert len(train) > 1
    assert sum(e["tokens"] for e in train) == meta["train_tokens"]
    assert TokenShards(tmp_path, "train").total_tokens == meta["train_tokens"]


def test_token_dtype_and_unigram_entropy():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert unigram_entropy(np.array([5, 5, 0])) == pytest.approx(math.log(2), abs=1e-15)
    assert unigram_entropy(np.array([7])) == 0.0


def test_loader_windows_come_from_the_shards(tokens_dir):
    shards = TokenShards(tokens_dir, "train")
    loader = WindowLoader(shards, seq_len=32, batch_size=6, seed=3)
    inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (6, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    flat = np.concatenate([np.asarray(a) for a in shards.arrays]).astype(np.int64)
    for row in inputs.numpy():  # every window is a contiguous run of one shard
        hits = np.nonzero(np.all(np.lib.stride_tricks.sliding_window_view(flat, 32) == row, axis=1))[0]
        assert hits.size >= 1


def test_loader_is_deterministic_and_resumes_exactly(tokens_dir):
    shards = TokenShards(tokens_dir, "train")
    a = WindowLoader(shards, 16, 4, seed=7)
    b = WindowLoader(shards, 16, 4, seed=7)
    first = [next(a) for _ in range(3)]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(first, [next(b) for _ in range(3)], strict=True))
    state = a.state_dict()
    json.dumps(state)  # plain data
    expected = [next(a)[0] for _ in range(4)]
    c = WindowLoader(shards, 16, 4, seed=99)
    c.load_state_dict(state)
    assert all(torch.equal(x, next(c)[0]) for x in expected)
    assert c.batches_drawn == 7
    other_rank = WindowLoader(shards, 16, 4, seed=7, rank=1)
    assert not torch.equal(next(other_rank)[0], first[0][0])
    assert torch.equal(a.fixed_batches(2)[1][0], c.fixed_batches(2)[1][0])


def test_loader_and_tokenizer_errors(tokens_dir, tmp_path):
    with pytest.raises(SapwoodError, match="needs shards of at least"):
        WindowLoader(TokenShards(tokens_dir, "val"), seq_len=10**9, batch_size=1)
    with pytest.raises(SapwoodError, match="has no meta.json"):
        TokenShards(tmp_path / "nowhere", "train")
    with pytest.raises(SapwoodError, match="vocab_size=100"):
        tokenize_corpus(stdlib_corpus(4), tmp_path, vocab_size=100)
