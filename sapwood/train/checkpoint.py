"""Training checkpoints: torch.distributed.checkpoint for model + optimizer, atomic, exact resume.

A checkpoint is a folder ``OUT/checkpoints/step_00000100``::

    .metadata, __0_0.distcp ...   model and optimizer (torch.distributed.checkpoint; sharded under FSDP2)
    trainer_rank00000.pt          scheduler, grad scaler, RNG (python, numpy, torch, cuda), data-loader
                                  position, step, callback states (per rank: RNG and data are per rank)
    config.yaml                   the config at that step: the *current* model shape (after growth)
    manifest.json                 written last: step and the size of every file

Writes go to ``step_....partial-PID`` (PID: rank 0's process), are fsynced, and are renamed into place
after every rank has finished (:mod:`sapwood.fsutil`); then the ``latest`` pointer is replaced
atomically and complete checkpoints older than the newest ``keep`` complete ones are removed (never
the one just written, never an incomplete one). On resume, leftovers of killed writers are tidied,
and a checkpoint without a manifest, or whose files do not match it (a truncated file), is skipped
with a warning and the next older one is tried; the newest complete checkpoint wins over ``latest``. Model
and optimizer state go through ``get_state_dict`` / ``set_state_dict``, which work the same for plain, FSDP2
and DTensor models and in a single process without ``init_process_group``.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from sapwood import fsutil
from sapwood.config import Config, load_config
from sapwood.errors import ConfigError, SapwoodError, SapwoodWarning

MANIFEST = "manifest.json"


class CheckpointDamaged(SapwoodError):
    """A checkpoint whose files match its manifest but cannot be read back (damaged bytes)."""


LATEST = "latest"
PREFIX = "step_"
# Optimizer state keyed by parameter name (not by param-group index), so a checkpoint written by
# pipeline stages that each hold different parameters reloads under any other layout.
STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """dcp warns on every call that it assumes one process when no process group exists: intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """All random states of this process, as plain Python and tensors (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": numpy_state["state"]["key"].tolist(), "pos": numpy_state["state"]["pos"]}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        "key": np.array(numpy_state["state"]["key"], dtype=np.uint32),
        "pos": numpy_state["state"]["pos"],
    }
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _rank0_value(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (collective when a process group exists)."""
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def save_checkpoint(
    root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any], config: Config, keep: int,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and durably (collective: every rank calls it)."""
    root = Path(root)
    rank, world = rank_and_world()
    final = root / checkpoint_name(step)
    staged = Path(_rank0_value(str(fsutil.partial_path(final))))
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        recover_checkpoints(root)
        fsutil.remove(staged)
        staged.mkdir()
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer, options=STATE_OPTIONS)
    with _single_process_ok():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(staged))
    torch.save(trainer_state, staged / f"trainer_rank{rank:05d}.pt")
    barrier()
    if rank == 0:
        try:
            config.save(staged / "config.yaml")
            fsutil.fsync_tree(staged)  # the data is durable before the manifest that vouches for it
            sizes = {p.name: p.stat().st_size for p in sorted(staged.iterdir()) if p.is_file()}
            manifest = {"step": step, "world_size": world, "files": sizes}
            fsutil.write_file(staged / MANIFEST, json.dumps(manifest, indent=1))
            fsutil.publish_dir(staged, final)
        finally:
            fsutil.remove(staged)
        fsutil.write_file(root / LATEST, final.name)
        prune_checkpoints(root, final, keep)
    barrier()
    return final


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len(PREFIX):])


def prune_checkpoints(root: str | Path, newest: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints older than ``newest`` that are not among the ``keep`` newest complete
    ones. ``newest`` itself, incomplete folders, later checkpoints and anything not named ``step_N``
    (``final``, ``latest``) are never deleted. Returns the deleted folders."""
    complete = [folder for folder in list_checkpoints(root) if checkpoint_problem(folder) is None]
    kept = {*complete[: max(keep, 1)], newest}
    removed = [f for f in complete if f not in kept and checkpoint_step(f) < checkpoint_step(newest)]
    for folder in removed:
        fsutil.remove(folder)
    if removed:
        fsutil.fsync_dir(Path(root))
    return removed


def recover_checkpoints(root: str | Path) -> list[str]:
    """Tidy what a killed writer left under ``root``: its unpublished ``step_N.partial-PID`` folders and
    ``latest`` temporaries are deleted; a ``step_N.old-PID`` whose ``step_N`` is missing is put back."""
    return fsutil.recover_stale(Path(root), rf"{PREFIX}\d+|{LATEST}")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under ``root``, newest step first (complete or not)."""
    root = Path(root)
    if not root.exists():
        return []
    folders = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(folders, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when its files match the manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as exc:  # bad JSON or bytes that are not text
        return f"unreadable manifest ({exc})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return "manifest lists no files"
    if folder.name.startswith(PREFIX) and manifest.get("step") != checkpoint_step(folder):
        return f"manifest is for step {manifest.get('step')}, not {checkpoint_step(folder)}"
    for name, size in files.items():
        path = folder / name
        if not path.exists():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, manifest says {size} (truncated or corrupt)"
    return None


def resume_candidates(root: str | Path) -> list[Path]:
    """Complete checkpoints, newest step first; warns for skipped ones (collective: every rank calls it).

    ``latest`` only names the last one published: a newer complete checkpoint (the writer died before
    it replaced ``latest``) wins over it. Leftovers of dead writers are tidied first (rank 0).
    """
    root = Path(root)
    if rank_and_world()[0] == 0:
        recover_checkpoints(root)
    barrier()
    good = []
    for folder in list_checkpoints(root):
        problem = checkpoint_problem(folder)
        if problem is None:
            good.append(folder)
        else:
            warnings.warn(f"skipping checkpoint {folder}: {problem}", SapwoodWarning, stacklevel=2)
    return good


def checkpoint_config(folder: Path) -> Config:
    """The config saved with the checkpoint; :class:`CheckpointDamaged` when it cannot be read."""
    try:
        return load_config(folder / "config.yaml")
    except (ConfigError, UnicodeDecodeError) as exc:
        raise CheckpointDamaged(f"{folder}: config.yaml is unreadable ({_first_line(exc)})") from exc


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model and optimizer in place; return this rank's trainer state (the caller applies it).

    Files that pass the manifest check but cannot be read raise :class:`CheckpointDamaged`.
    """
    rank, _ = rank_and_world()
    model_state, optimizer_state = get_state_dict(model, optimizer, options=STATE_OPTIONS)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(folder))
    except CheckpointException as exc:
        raise CheckpointDamaged(
            f"{folder}: model/optimizer files are unreadable ({_first_line(exc)})"
        ) from exc
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        options=STATE_OPTIONS,
    )
    trainer_file = folder / f"trainer_rank{rank:05d}.pt"
    if not trainer_file.exists():
        trainer_file = folder / "trainer_rank00000.pt"
    try:
        return torch.load(trainer_file, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:  # what torch.load raises on damaged bytes
        raise CheckpointDamaged(f"{trainer_file}: unreadable ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state on CPU; under FSDP2 every rank gets it (rank 0 writes it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
