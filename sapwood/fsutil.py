"""Durable publishing of files and folders: write beside the target, fsync, rename, fsync the parent.

A file or folder ``TARGET`` is first written as ``TARGET.partial-PID`` (PID: the writing process);
its files and folders are fsynced and it is renamed to ``TARGET``. An existing ``TARGET`` is renamed
to ``TARGET.old-PID`` just before and deleted once the new one is in place. The parent folder is
fsynced after the renames, so a power loss cannot undo a publish that has returned.

:func:`recover_stale` tidies what a killed writer left behind: its ``.partial-PID`` is deleted, and
its ``.old-PID`` is deleted when ``TARGET`` exists or renamed back to ``TARGET`` when the writer died
between the two renames (so the previous complete version is never lost). Leftovers of a process
that is still running on this machine are never touched.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = "partial"
OLD = "old"


def partial_path(target: Path) -> Path:
    """Where this process writes ``target`` before publishing it."""
    return target.with_name(f"{target.name}.{PARTIAL}-{os.getpid()}")


def old_path(target: Path) -> Path:
    """Where this process moves the previous ``target`` while publishing a new one."""
    return target.with_name(f"{target.name}.{OLD}-{os.getpid()}")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (created, renamed, removed files) durable."""
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then every folder, deepest first."""
    for current, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(current) / name)
        fsync_dir(Path(current))


def remove(path: Path) -> None:
    """Delete a file or folder tree; nothing when it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_file(path: Path, data: str | bytes) -> None:
    """Replace the file ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A fresh ``TARGET.partial-PID`` folder to write into; published to ``target`` when the block
    ends without an exception, deleted when it raises (``target`` is then left as it was). Leftovers
    of dead writers of ``target`` are tidied first (:func:`recover_stale`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_stale(target.parent, re.escape(target.name))
    staged = partial_path(target)
    remove(staged)
    staged.mkdir()
    try:
        yield staged
        publish_dir(staged, target)
    finally:
        remove(staged)


def publish_dir(staged: Path, target: Path) -> None:
    """Move the finished folder ``staged`` to ``target`` durably; a previous ``target`` is replaced."""
    staged, target = Path(staged), Path(target)
    fsync_tree(staged)
    old = None
    if target.exists() or target.is_symlink():
        old = old_path(target)
        remove(old)
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        remove(old)
        fsync_dir(target.parent)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (this process counts as running)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True  # cannot tell (e.g. Windows): keep it
    return True


def recover_stale(folder: Path, names: str, remove_partials: bool = True) -> list[str]:
    """Tidy the leftovers of dead writers in ``folder`` for targets whose names match the regular
    expression ``names``: delete ``NAME.partial-PID`` (unless ``remove_partials`` is false: readers leave
    them to the next writer); delete ``NAME.old-PID`` when ``NAME`` exists, otherwise rename it back to
    ``NAME``. Safe to run from several processes at once. Returns what was done, one line per entry."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"(?P<name>{names})\.(?P<kind>{PARTIAL}|{OLD})-(?P<pid>\d+)")
    done = []
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    for kind in (OLD, PARTIAL):  # restore old versions before anything else is removed
        for path in entries:
            match = pattern.fullmatch(path.name)
            if match is None or match["kind"] != kind or pid_alive(int(match["pid"])):
                continue
            if kind == PARTIAL and not remove_partials:
                continue
            target = folder / match["name"]
            if kind == OLD and not (target.exists() or target.is_symlink()):
                try:
                    os.replace(path, target)
                except FileNotFoundError:  # another process restored it first
                    continue
                done.append(f"restored {target.name} from {path.name}")
            else:
                remove(path)
                done.append(f"removed {path.name}")
    if done:
        fsync_dir(folder)
    return done
