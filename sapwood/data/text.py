"""Text data: a byte-level BPE tokenizer, memory-mapped token shards and a random-window loader.

``sapwood tokenize`` (:func:`tokenize_corpus`) writes a folder::

    tokenizer.json            byte-level BPE (Hugging Face ``tokenizers``), ``<|endoftext|>`` = id 0
    meta.json                 dtype, vocab size, eos id, shards, token counts, unigram entropies
    train_00000.bin ...       raw uint16 (vocab <= 65536) or uint32 token ids; documents end with eos
    train_00000.docs.npy      int64 start offset of every document in the shard
    val_00000.bin ...         the validation split (a document goes wholly to one split)

The split is deterministic: a document goes to validation when a hash of its file name falls under
``val_fraction``, so adding files never moves existing ones across splits. :class:`WindowLoader`
draws random windows of ``seq_len + 1`` tokens with one vectorized numpy gather per batch (no
per-token Python); its random state is a plain dict, so a run resumes at exactly the next batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sapwood import fsutil
from sapwood.errors import SapwoodError

EOS = "<|endoftext|>"
META = "meta.json"
TOKENIZER = "tokenizer.json"
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
DEFAULT_SHARD_TOKENS = 50_000_000


def stdlib_corpus(max_files: int | None = 300) -> list[Path]:
    """``.py`` files of the running Python's standard library (no site-packages, no tests).

    ``max_files`` picks that many files evenly spread over the sorted list (deterministic); None = all.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )
    if max_files is not None and len(files) > max_files:
        stride = len(files) / max_files
        files = [files[int(i * stride)] for i in range(max_files)]
    return files


def collect_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named in ``inputs``; folders contribute their ``.py/.txt/.md/.rst`` files, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise SapwoodError(f"corpus path {str(path)!r} does not exist; give files or folders of text")
    if not files:
        raise SapwoodError(f"no text files ({', '.join(TEXT_SUFFIXES)}) found in {[str(i) for i in inputs]}")
    return files


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``documents``; ``<|endoftext|>`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise SapwoodError(
            f"vocab_size={vocab_size} is too small; byte-level BPE needs at least 257 (256 bytes + eos)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split: a stable hash of the document's name, compared with ``val_fraction``."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return digest / 2**64 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the empirical token distribution: the loss of the best context-free model."""
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def _write_split(
    out: Path, split: str, docs: list[list[int]], eos_id: int, dtype: np.dtype, shard_tokens: int
) -> list[dict[str, Any]]:
    """Pack documents (each followed by eos) into shards of at most ``shard_tokens`` (whole documents)."""
    shards: list[dict[str, Any]] = []
    pending: list[list[int]] = []
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        if not pending:
            return
        lengths = np.array([len(d) + 1 for d in pending], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        tokens = np.empty(int(lengths.sum()), dtype=dtype)
        for start, doc in zip(starts, pending, strict=True):
            tokens[start : start + len(doc)] = doc
            tokens[start + len(doc)] = eos_id
        name = f"{split}_{len(shards):05d}"
        tokens.tofile(out / f"{name}.bin")
        np.save(out / f"{name}.docs.npy", starts)
        shards.append({"file": f"{name}.bin", "tokens": int(tokens.size), "documents": len(pending)})
        pending, pending_tokens = [], 0

    for doc in docs:
        if pending and pending_tokens + len(doc) + 1 > shard_tokens:
            flush()
        pending.append(doc)
        pending_tokens += len(doc) + 1
    flush()
    return shards


def tokenize_corpus(
    files: list[Path], out: str | Path, vocab_size: int = 4096, val_fraction: float = 0.05,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict[str, Any]:
    """Train a tokenizer on ``files``, encode them in parallel and write the shard folder; return meta.

    The folder is written beside ``out`` and published in one rename (:func:`sapwood.fsutil.staged_dir`),
    so a crash leaves the previous folder whole; ``out`` may be missing, empty or an earlier token folder.
    """
    if not 0.0 < val_fraction < 1.0:
        raise SapwoodError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    out = Path(out)
    _check_replaceable(out)
    names = [str(p) for p in files]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    names, texts = [names[i] for i in keep], [texts[i] for i in keep]
    if len(texts) < 2:
        raise SapwoodError(
            f"corpus has {len(texts)} non-empty documents; need at least 2 (one for validation)"
        )
    tokenizer = train_tokenizer(texts, vocab_size)
    eos_id = tokenizer.token_to_id(EOS)
    encoded = [e.ids for e in tokenizer.encode_batch(texts)]  # parallel (Rust threads)
    root = os.path.commonpath(names) if len(names) > 1 else ""
    val_mask = [is_validation(os.path.relpath(n, root) if root else n, val_fraction) for n in names]
    if not any(val_mask):
        val_mask[-1] = True
    if all(val_mask):
        val_mask[0] = False
    real_vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(real_vocab)
    splits = {
        "train": [d for d, v in zip(encoded, val_mask, strict=True) if not v],
        "val": [d for d, v in zip(encoded, val_mask, strict=True) if v],
    }
    meta: dict[str, Any] = {"vocab_size": real_vocab, "dtype": dtype.name, "eos_id": eos_id, "shards": {}}
    with fsutil.staged_dir(out) as staged:
        tokenizer.save(str(staged / TOKENIZER))
        for split, docs in splits.items():
            meta["shards"][split] = _write_split(staged, split, docs, eos_id, dtype, shard_tokens)
            counts = np.bincount(
                np.concatenate([np.asarray(d, dtype=np.int64) for d in docs] + [np.full(len(docs), eos_id)]),
                minlength=real_vocab,
            )
            meta[f"{split}_tokens"] = int(counts.sum())
            meta[f"{split}_documents"] = len(docs)
            meta[f"{split}_unigram_entropy"] = unigram_entropy(counts)
        (staged / META).write_text(json.dumps(meta, indent=1))
    return meta


def _is_token_file(name: str) -> bool:
    return name in (META, TOKENIZER) or name.endswith((".bin", ".docs.npy"))


def _check_replaceable(out: Path) -> None:
    """``out`` is replaced as a whole: refuse a folder holding anything but a token folder's files."""
    if out.exists() and not out.is_dir():
        raise SapwoodError(f"--out {str(out)!r} is a file; give a folder for the token shards")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and _is_token_file(p.name)))
        if foreign:
            raise SapwoodError(
                f"--out {str(out)!r} holds {foreign[:3]} (not token shards) and would be replaced; "
                "choose an empty or new folder"
            )


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / META).exists():
        raise SapwoodError(
            f"data path {str(folder)!r} has no {META}; create it with `sapwood tokenize CORPUS --out "
            f"{folder}`"
        )
    return json.loads((folder / META).read_text())


class TokenShards:
    """The memory-mapped shards of one split (``train`` or ``val``)."""

    def __init__(self, folder: str | Path, split: str):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        dtype = np.dtype(self.meta["dtype"])
        entries = self.meta["shards"].get(split) or []
        if not entries:
            raise SapwoodError(f"data path {str(self.folder)!r} has no {split!r} shards")
        for entry in entries:
            path = self.folder / entry["file"]
            expected = entry["tokens"] * dtype.itemsize
            actual = path.stat().st_size if path.exists() else None
            if actual != expected:
                found = "is missing" if actual is None else f"has {actual} bytes"
                raise SapwoodError(
                    f"data path {str(self.folder)!r}: {entry['file']} {found}, {META} says {expected} "
                    "(damaged); run `sapwood tokenize` again"
                )
        self.arrays = [np.memmap(self.folder / e["file"], dtype=dtype, mode="r") for e in entries]

    @property
    def total_tokens(self) -> int:
        return sum(a.size for a in self.arrays)


@dataclass
class WindowLoader:
    """Endless batches of random windows: ``(inputs, targets)`` LongTensors ``[batch, seq_len]``.

    Windows start anywhere (documents are separated by eos, as in GPT packing). Each rank of a
    data-parallel run gets its own stream (seed, rank). ``state_dict()`` captures the generator, so
    ``load_state_dict`` continues with exactly the batch that would have come next.
    """

    shards: TokenShards
    seq_len: int
    batch_size: int
    seed: int = 0
    rank: int = 0

    def __post_init__(self) -> None:
        window = self.seq_len + 1
        self._starts = np.array([max(a.size - window + 1, 0) for a in self.shards.arrays], dtype=np.int64)
        if self._starts.sum() == 0:
            longest = max(a.size for a in self.shards.arrays)
            raise SapwoodError(
                f"seq_len={self.seq_len} needs shards of at least {window} tokens; the longest has {longest}"
            )
        self._cumulative = np.cumsum(self._starts)
        self._offsets = np.arange(window, dtype=np.int64)
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.rank])))
        self.batches_drawn = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = self._rng.integers(0, int(self._cumulative[-1]), size=self.batch_size)
        self.batches_drawn += 1
        return self.gather(picks)

    def gather(self, picks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows for global start indices ``picks`` (one fancy-index read per shard)."""
        shard_ids = np.searchsorted(self._cumulative, picks, side="right")
        local = picks - np.concatenate(([0], self._cumulative[:-1]))[shard_ids]
        windows = np.empty((len(picks), self.seq_len + 1), dtype=np.int64)
        for shard_id in np.unique(shard_ids):
            rows = np.nonzero(shard_ids == shard_id)[0]
            windows[rows] = self.shards.arrays[shard_id][local[rows, None] + self._offsets]
        tensor = torch.from_numpy(windows)
        return tensor[:, :-1], tensor[:, 1:]

    def fixed_batches(self, count: int, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same ``count`` batches every call (for evaluation), independent of the loader's state."""
        rng = np.random.Generator(np.random.PCG64(seed))
        return [
            self.gather(rng.integers(0, int(self._cumulative[-1]), size=self.batch_size))
            for _ in range(count)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self._rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = int(state["batches_drawn"])
