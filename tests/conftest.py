"""Fixtures shared by the test files: a token folder, a tiny language-model folder, cube stores, a
callback that crashes training at a given step, a check that runs are reproducible and resume exactly, and
torch on one thread for a module."""

import os
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The token folder every training test reads: 30 stdlib files, byte-level BPE of at most 320 tokens.
TOKENS = {"vocab_size": 320, "val_fraction": 0.15}

# The tiny random model that the inference, serving and generation tests load.
TINY_MODEL = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, trained_context=64, max_context=160,
                  rope_scaling={"type": "yarn", "factor": 2.5}, init_std=0.25, tied_embeddings=False)


@pytest.fixture
def tiny_config():
    from sapwood.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models run fastest so (and do not fight other tests for
    cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_files() -> list[Path]:
    from sapwood.data.text import stdlib_corpus

    return stdlib_corpus(max_files=30)


@pytest.fixture(scope="session")
def tokens_settings() -> dict:
    return dict(TOKENS)


@pytest.fixture(scope="session")
def tokens_dir(tmp_path_factory, corpus_files) -> Path:
    """A token folder (``sapwood tokenize``) of ``corpus_files`` with ``TOKENS`` settings; read-only."""
    from sapwood.data.text import tokenize_corpus

    out = tmp_path_factory.mktemp("tokens")
    tokenize_corpus(corpus_files, out, **TOKENS)
    return out


def train_tokenizer(out: Path, vocab_size: int = 384) -> Path:
    """A small byte-level BPE ``tokenizer.json`` in ``out``, trained on stdlib files (no downloads)."""
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


def interrupt_once_logged(run: subprocess.Popen, metrics: Path, event: str, within: float, finish: float):
    """Press Ctrl-C on the CLI process ``run`` once its ``metrics.jsonl`` records ``event`` (at most
    ``within`` seconds); its (stdout, stderr) once it exits (at most ``finish`` seconds later)."""
    deadline = time.monotonic() + within
    while not (metrics.exists() and f'"event": "{event}"' in metrics.read_text()):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    return run.communicate(timeout=finish)


def make_lm_folder(root: Path, seed: int = 0, **overrides) -> Path:
    """A random ``TINY_MODEL`` checkpoint folder with a tokenizer under ``root``."""
    from tokenizers import Tokenizer

    from sapwood.config import Config, ModelConfig
    from sapwood.model.folder import save_folder
    from sapwood.model.transformer import Decoder

    tokenizer_path = train_tokenizer(root)
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    cfg = ModelConfig(vocab_size=vocab, **{**TINY_MODEL, **overrides})
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():  # make <|endoftext|> (id 0) unlikely so outputs run to max_tokens
        model.output.weight[0].zero_()
    return save_folder(
        model, Config(name="tiny-test", model=cfg), root / "tiny-lm", tokenizer_file=tokenizer_path
    )


@pytest.fixture(scope="session")
def lm_folder(tmp_path_factory) -> Path:
    return make_lm_folder(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="session")
def make_cube_store(tmp_path_factory):
    """``make_cube_store(runs, grid, seed)``: simulate ``runs`` planets on ``grid`` and prepare a store."""
    from sapwood.data.cubes import prepare
    from sapwood.data.simulate import simulate_ensemble
    from sapwood.data.store import CubeStore

    def make(runs: int, grid, seed: int) -> "CubeStore":
        root = tmp_path_factory.mktemp("cubes")
        inputs = simulate_ensemble(root / "runs", runs=runs, grid=grid, seed=seed, progress=False)
        prepare(inputs, root / "store", progress=False)
        return CubeStore(root / "store")

    return make


@pytest.fixture(scope="session")
def crash_at():
    """``crash_at(step)``: a training callback that raises ``RuntimeError("simulated crash")`` at ``step``."""
    from sapwood.train.callbacks import Callback

    class CrashAt(Callback):
        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, trainer, step, metrics):
            if step == self.step:
                raise RuntimeError("simulated crash")

    return CrashAt


@pytest.fixture(scope="session")
def resumes_exactly(crash_at):
    """``resumes_exactly(config, crash_step, resumed_step)``: trains ``config("a")`` and ``config("b")`` (the
    name is the run's folder), crashes ``config("c")`` at ``crash_step`` and resumes it, which must start at
    ``resumed_step``; asserts that the three final weights are equal and returns ``{name: weights}``."""
    from safetensors.torch import load_file

    from sapwood.train.loop import Trainer

    def check(config, crash_step: int, resumed_step: int) -> dict:
        finals = {name: Trainer(config(name)).fit()["final"] for name in "ab"}
        with pytest.raises(RuntimeError, match="simulated crash"):
            Trainer(config("c"), [crash_at(crash_step)]).fit()
        resumed = Trainer(config("c"), resume=True)
        assert resumed.step == resumed_step
        finals["c"] = resumed.fit()["final"]
        weights = {name: load_file(Path(final) / "model.safetensors") for name, final in finals.items()}
        for key, value in weights["a"].items():
            assert torch.equal(weights["b"][key], value), key
            assert torch.equal(weights["c"][key], value), key
        return weights

    return check
