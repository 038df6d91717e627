"""Files that survive crashes. Each publish (training checkpoint with ``latest`` and pruning, model folder,
token folder, cube store) runs in a forked process that SIGKILLs itself at its k-th write, fsync, rename or
delete, for every k until the publish completes. After each kill the next reader or writer must find the
newest complete state, and nothing complete may have been deleted. Also: truncated files, stale temporaries
of dead processes, safe pruning, and resume errors that are bugs rather than damage."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from sapwood import fsutil
from sapwood.config import Config, ModelConfig, validate
from sapwood.data.text import TokenShards, read_meta, tokenize_corpus
from sapwood.errors import SapwoodError
from sapwood.model import load, save_folder
from sapwood.model.transformer import Decoder
from sapwood.train import checkpoint as ckpt

TINY = ModelConfig(vocab_size=64, hidden=16, layers=1, heads=2, kv_heads=1, ffn=32, trained_context=8)
MAX_STEPS = 400  # more durable steps than any publish here takes; a runaway loop fails instead of hanging


# --------------------------------------------------------------------------- the crash injector


def _child(k: int, root: str, operation: Callable[[], None]) -> None:
    """Run ``operation``; SIGKILL this process at its k-th write/fsync/rename/delete under ``root``."""
    torch.set_num_threads(1)
    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1
        if steps == k:
            os.kill(os.getpid(), signal.SIGKILL)

    def under_root(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and under_root(path):
                step()
        elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree") and under_root(
            args[0]
        ):
            step()

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        step()
        real_fsync(fd)

    os.fsync = fsync
    sys.addaudithook(hook)
    operation()


def killed_at(k: int, root: Path, operation: Callable[[], None]) -> bool:
    """Run ``operation`` in a forked child killed at its k-th durable step: True when it was killed,
    False when it finished first."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(k, str(root), operation))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode is not None, "the child hung"
    if proc.exitcode == -signal.SIGKILL:
        return True
    assert proc.exitcode == 0, f"the operation failed at k={k} (exit {proc.exitcode})"
    return False


def crash_matrix(
    template: Path, work: Path, operation: Callable[[], None], check: Callable[[int], None]
) -> int:
    """For k = 1, 2, ...: restore ``work`` from ``template``, kill ``operation`` at step k, ``check(k)``;
    ends with the run that was not killed (checked as well). Returns the number of kill points."""
    for k in range(1, MAX_STEPS):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work, symlinks=True)
        was_killed = killed_at(k, work, operation)
        check(k)
        if not was_killed:
            return k - 1
    raise AssertionError(f"the operation took more than {MAX_STEPS} durable steps")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- training checkpoints


def tiny_model(seed: int) -> tuple[Decoder, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Decoder(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(root: Path, step: int, keep: int = 2, seed: int | None = None) -> Path:
    model, optimizer = tiny_model(step if seed is None else seed)
    return ckpt.save_checkpoint(root, step, model, optimizer, {"step": step}, Config(model=TINY), keep)


def weights_of(folder: Path) -> torch.Tensor:
    """The embedding matrix stored in a checkpoint (read back through DCP)."""
    model, optimizer = tiny_model(99)
    state = ckpt.load_checkpoint(folder, model, optimizer)
    assert state["step"] == ckpt.checkpoint_step(folder)
    return model.tok_embeddings.weight.detach().clone()


def complete(root: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(root) if ckpt.checkpoint_problem(p) is None]


def newest_after_recovery(root: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the killed writer's folders are skipped with a warning
        candidates = ckpt.resume_candidates(root)
    assert leftovers(root) == []
    return candidates[0]


def same_files(folder: Path, reference: Path) -> bool:
    """Whether ``folder`` holds the files of the complete checkpoint ``reference`` byte for byte, but for
    DCP's ``.metadata`` (it records the folder it was written to) and the manifest holding its size."""
    names = sorted(p.name for p in reference.iterdir() if p.name not in (".metadata", ckpt.MANIFEST))
    return all((folder / name).read_bytes() == (reference / name).read_bytes() for name in names)


def test_checkpoint_save_killed_at_every_step(tmp_path):
    template, reference, work = tmp_path / "template", tmp_path / "reference", tmp_path / "work"
    save(template, 1)
    save(template, 2)
    new = save(reference, 3)
    model, optimizer = tiny_model(3)
    outcomes = set()

    def check(k: int) -> None:
        newest = newest_after_recovery(work)
        names = complete(work)
        assert "step_00000002" in names  # the newest complete one before the save is never lost
        if newest.name == "step_00000002":  # the new one is not published: nothing may have been pruned
            assert names == ["step_00000002", "step_00000001"]
            assert same_files(newest, template / "step_00000002")
        else:
            assert names[:2] == ["step_00000003", "step_00000002"] and same_files(newest, new)
        assert (work / ckpt.LATEST).read_text() in ("step_00000002", "step_00000003")
        outcomes.add(newest.name)

    def operation():
        return ckpt.save_checkpoint(work, 3, model, optimizer, {"step": 3}, Config(model=TINY), 2)

    kill_points = crash_matrix(template, work, operation, check)
    assert outcomes == {"step_00000002", "step_00000003"} and kill_points >= 10
    assert complete(work) == ["step_00000003", "step_00000002"]  # keep=2 pruned step 1 after a full save
    assert (work / ckpt.LATEST).read_text() == "step_00000003"
    assert torch.equal(weights_of(work / "step_00000003"), model.tok_embeddings.weight)


def test_checkpoint_rewrite_of_the_same_step_never_loses_it(tmp_path):
    template, reference, work = tmp_path / "template", tmp_path / "reference", tmp_path / "work"
    save(template, 1)
    old = save(template, 2)
    new = save(reference, 2, seed=7)
    model, optimizer = tiny_model(7)

    def check(k: int) -> None:
        newest = newest_after_recovery(work)
        assert newest.name == "step_00000002" and complete(work) == ["step_00000002", "step_00000001"]
        assert same_files(newest, old) or same_files(newest, new)

    def operation():
        return ckpt.save_checkpoint(work, 2, model, optimizer, {"step": 2}, Config(model=TINY), 2)

    crash_matrix(template, work, operation, check)
    assert same_files(work / "step_00000002", new)


def test_pruning_keeps_what_was_just_written_and_everything_newer(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 30, keep=1)
    damaged = next((root / "step_00000030").glob("*.distcp"))
    damaged.write_bytes(damaged.read_bytes()[:-7])  # truncated: resume falls back, as after a power loss
    (root / "final").mkdir()
    (root / "final" / "model.safetensors").write_bytes(b"x")
    save(root, 10, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000030", "step_00000010"]
    assert (root / ckpt.LATEST).read_text() == "step_00000010" and complete(root) == ["step_00000010"]
    save(root, 20, keep=1)
    assert complete(root) == ["step_00000020"]  # older complete ones go, one at a time
    save(root, 30, keep=1)  # replaces the damaged one
    assert complete(root) == ["step_00000030"]
    assert (root / "final" / "model.safetensors").read_bytes() == b"x"  # never pruned

    save(root, 50, keep=1)
    save(root, 40, keep=1)  # e.g. resumed from 40 after 50 could not be read: 50 stays, 40 stays
    assert complete(root) == ["step_00000050", "step_00000040"]


@pytest.mark.parametrize(
    "name", ["__0_0.distcp", ".metadata", "trainer_rank00000.pt", "config.yaml", "manifest.json"]
)
def test_a_truncated_file_makes_resume_take_the_previous_checkpoint(tmp_path, name):
    root = tmp_path / "checkpoints"
    save(root, 1)
    newest = save(root, 2)
    path = newest / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000002"):
        candidates = ckpt.resume_candidates(root)
    assert [p.name for p in candidates] == ["step_00000001"]


@pytest.mark.parametrize("manifest", [b"{}", b"\xff\xfe not text", b'{"step": 1, "files": {}}'])
def test_a_manifest_that_does_not_vouch_for_its_folder_is_skipped(tmp_path, manifest):
    root = tmp_path / "checkpoints"
    save(root, 1)
    (save(root, 2) / ckpt.MANIFEST).write_bytes(manifest)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000002.*manifest"):
        assert [p.name for p in ckpt.resume_candidates(root)] == ["step_00000001"]


def test_newest_complete_checkpoint_wins_over_a_stale_latest(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1)
    save(root, 2)
    (root / ckpt.LATEST).write_text("step_00000001")  # the writer died before it replaced latest
    assert [p.name for p in ckpt.resume_candidates(root)] == ["step_00000002", "step_00000001"]


def test_stale_temporaries_of_dead_processes_are_tidied_and_live_ones_kept(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(root, step, keep=3)
    gone, alive = dead_pid(), os.getppid()
    (root / "step_00000002").rename(root / f"step_00000002.old-{gone}")  # died between the two renames
    shutil.copytree(root / f"step_00000002.old-{gone}", root / f"step_00000002.partial-{gone}")
    shutil.copytree(root / "step_00000003", root / f"step_00000003.old-{gone}")  # died before deleting it
    (root / f"step_00000004.partial-{gone}").mkdir()  # died while writing
    (root / f"latest.partial-{gone}").write_text("step_00000004")
    (root / f"step_00000005.partial-{alive}").mkdir()  # a writer that is still running
    assert [p.name for p in ckpt.resume_candidates(root)] == [
        "step_00000003",
        "step_00000002",
        "step_00000001",
    ]
    assert leftovers(root) == [f"step_00000005.partial-{alive}"]
    assert (root / ckpt.LATEST).read_text() == "step_00000003"


def test_a_damaged_checkpoint_is_skipped_but_a_bug_in_resume_is_raised(tokens_dir, tmp_path, monkeypatch):
    from sapwood.train.loop import Trainer

    settings = {
        "steps": 4, "batch_size": 2, "micro_batch_size": 2, "warmup_steps": 1, "eval_every": 1000,
        "eval_batches": 1, "save_every": 2, "log_every": 1, "out_dir": str(tmp_path), "progress": False,
    }
    config = validate(Config, {"model": {**TINY.model_dump(), "vocab_size": 320}, "train": settings,
                               "data": {"path": str(tokens_dir)}})
    Trainer(config).fit()
    trainer_file = tmp_path / "checkpoints" / "step_00000004" / "trainer_rank00000.pt"
    trainer_file.write_bytes(bytes(trainer_file.stat().st_size))  # same size: the manifest cannot tell
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000004.*unreadable"):
        assert Trainer(config, resume=True).step == 2

    def broken(*args, **kwargs):
        raise TypeError("a bug, not damage")

    monkeypatch.setattr(ckpt, "load_checkpoint", broken)
    with pytest.raises(TypeError, match="a bug"):
        Trainer(config, resume=True)


# --------------------------------------------------------------------------- published folders


def versions_after_kills(
    tmp_path: Path, name: str, write: Callable[[Path], None], rewrite: Callable[[Path], None],
    read: Callable[[Path], object],
) -> set:
    """``write`` the folder ``name`` once, then kill ``rewrite`` of it at every durable step. After each kill
    the next writer's tidying (:func:`fsutil.recover_stale`) must leave no temporaries and a folder that
    ``read`` accepts; returns what ``read`` said over all kills (both versions when nothing is lost)."""
    template, work = tmp_path / "template", tmp_path / "work"
    template.mkdir()
    write(template / name)
    seen = set()

    def check(k: int) -> None:
        fsutil.recover_stale(work, name)
        assert leftovers(work) == []
        seen.add(read(work / name))

    crash_matrix(template, work, lambda: rewrite(work / name), check)
    return seen


def test_model_folder_save_killed_at_every_step(tmp_path):
    config = Config(model=TINY)
    versions = {seed: tiny_model(seed)[0] for seed in (1, 2)}

    def which(folder: Path) -> int:
        state = load(folder).state_dict()
        return next(seed for seed, model in versions.items()
                    if all(torch.equal(state[key], value) for key, value in model.state_dict().items()))

    seen = versions_after_kills(tmp_path, "final", lambda out: save_folder(versions[1], config, out),
                                lambda out: save_folder(versions[2], config, out), which)
    assert seen == {1, 2}


def test_tokenize_killed_at_every_step(tmp_path, corpus_files):
    from tokenizers import Tokenizer

    files = corpus_files[:6]

    def vocab(folder: Path) -> int:
        meta = read_meta(folder)
        assert Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size() == meta["vocab_size"]
        assert TokenShards(folder, "train").total_tokens == meta["train_tokens"]  # every shard's size checked
        return meta["vocab_size"]

    seen = versions_after_kills(tmp_path, "tokens", lambda out: tokenize_corpus(files, out, 280, 0.3),
                                lambda out: tokenize_corpus(files, out, 300, 0.3), vocab)
    assert len(seen) == 2


def test_cube_store_publish_killed_at_every_step(tmp_path):
    from sapwood.data.cubes import prepare
    from sapwood.data.simulate import Grid, simulate_ensemble
    from sapwood.data.store import FRAMES_FILE, CubeStore

    runs = simulate_ensemble(
        tmp_path / "runs", runs=2, grid=Grid(levels=2, nlat=8, nlon=16, times=3, spinup_days=1), seed=3,
        progress=False,
    )

    def rows(folder: Path) -> int:
        store = CubeStore(folder)
        frames = np.fromfile(folder / FRAMES_FILE, dtype=np.float32)
        assert frames.size == store.rows * int(np.prod(store.shape[1:]))
        return store.rows

    seen = versions_after_kills(tmp_path, "store", lambda out: prepare(runs[:1], out, progress=False),
                                lambda out: prepare(runs, out, progress=False), rows)
    assert seen == {3, 6}


def test_token_shards_check_their_sizes_and_tokenize_keeps_foreign_folders(tmp_path, corpus_files):
    out = tmp_path / "tokens"
    meta = tokenize_corpus(corpus_files[:6], out, vocab_size=280, val_fraction=0.3)
    shard = out / meta["shards"]["train"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(
        SapwoodError, match=r"train_00000.bin has \d+ bytes, meta.json says \d+ .*sapwood tokenize"
    ):
        TokenShards(out, "train")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "plan.txt").write_text("keep me")
    with pytest.raises(SapwoodError, match=r"holds \['plan.txt'\] .*choose an empty or new folder"):
        tokenize_corpus(corpus_files[:6], notes, vocab_size=280)
    assert (notes / "plan.txt").read_text() == "keep me"


def test_write_file_replaces_atomically(tmp_path):
    template, work = tmp_path / "t", tmp_path / "w"
    template.mkdir()
    fsutil.write_file(template / "pointer", "old")

    def check(k: int) -> None:
        fsutil.recover_stale(work, "pointer")
        assert (work / "pointer").read_text() in ("old", "new") and leftovers(work) == []

    # open, fsync, rename, fsync of the folder
    assert crash_matrix(template, work, lambda: fsutil.write_file(work / "pointer", "new"), check) == 4
    assert (work / "pointer").read_text() == "new"
