"""Shared fixtures for the inference, serving and generation tests: a tiny random model folder with a
small byte-level BPE tokenizer trained here (no downloads). Import the fixtures you need by name."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

TINY_MODEL = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, trained_context=64, max_context=160,
                  rope_scaling={"type": "yarn", "factor": 2.5}, init_std=0.25, tied_embeddings=False)


def train_tokenizer(out: Path, vocab_size: int = 384) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("[a-c]*.py"))[:12]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    path = out / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def make_lm_folder(root: Path, seed: int = 0, **overrides) -> Path:
    from sapwood.config import Config, ModelConfig
    from sapwood.model.folder import save_folder
    from sapwood.model.transformer import Decoder

    tokenizer_path = train_tokenizer(root)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    cfg = ModelConfig(vocab_size=vocab, **{**TINY_MODEL, **overrides})
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():  # make <|endoftext|> (id 0) unlikely so outputs run to max_tokens
        model.output.weight[0].zero_()
    return save_folder(model, Config(name="tiny-test", model=cfg), root / "tiny-lm", tokenizer_file=tokenizer_path)


@pytest.fixture(scope="session")
def lm_folder(tmp_path_factory) -> Path:
    return make_lm_folder(tmp_path_factory.mktemp("lm"))
