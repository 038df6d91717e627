"""Ctrl-C (SIGINT) during training: a stop request, never a cut checkpoint.

While :func:`stop_on_ctrl_c` is active (``sapwood train`` holds it from its first line to its summary):

- the first Ctrl-C only records a request; the training loop acts on it at its next safe point (before the
  first step, or after the current step and its checkpoint), see :func:`stop_requested`;
- a further Ctrl-C raises ``KeyboardInterrupt`` at once;
- inside :func:`protected` (checkpoint reads and writes) every Ctrl-C waits until the block is done, so a
  checkpoint is never cut half-way and a read is never mistaken for a damaged file
  (torch.distributed.checkpoint wraps a ``KeyboardInterrupt`` into its own ``CheckpointException``).

Without an active :func:`stop_on_ctrl_c` (a library caller, Python's default handler), :func:`protected`
still holds a Ctrl-C until the block is done and then raises ``KeyboardInterrupt``.

A light module (no torch): the CLI installs the handler before its heavy imports.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sapwood.errors import SapwoodError


class TrainingInterrupted(SapwoodError):
    """Ctrl-C stopped the run at ``step`` (None: before its first step); ``checkpoint`` is the newest one it
    can resume from (None: none written yet; with ``save_every`` None too: the run wrote nothing)."""

    def __init__(self, step: int | None, checkpoint: Path | None, save_every: int | None):
        self.step, self.checkpoint = step, checkpoint
        if checkpoint is not None:
            number = re.search(r"(\d+)$", Path(checkpoint).name)
            where = f"last checkpoint: step {int(number[1]) if number else '?'} ({checkpoint})"
        elif save_every is not None:
            where = f"no checkpoint written yet (one every train.save_every={save_every} steps)"
        else:
            where = "nothing was written"
        when = f"at step {step}" if step is not None else "before its first step"
        super().__init__(f"training interrupted {when}; {where}")


HELD_NOTICE = b"Ctrl-C: the checkpoint read or write in progress finishes first, then training stops\n"


@dataclass
class StopState:
    """What Ctrl-C has asked for so far: ``requested`` (a stop at the next safe point), ``held`` (a Ctrl-C
    that arrived inside :func:`protected` and raises when it ends), ``protected`` (nesting depth) and
    ``immediate`` (every Ctrl-C raises: no safe point will ask)."""

    requested: bool = False
    held: bool = False
    protected: int = 0
    immediate: bool = False


_active: StopState | None = None


def _on_sigint(signum: int, frame: object) -> None:
    state = _active
    if state is None:  # restored concurrently: behave as Python's default handler
        raise KeyboardInterrupt
    wants_out = state.requested or state.immediate
    if not wants_out:
        state.requested = True
        return
    if state.protected:
        state.held = True
        os.write(2, HELD_NOTICE)  # unbuffered: safe even if the main thread was inside a print
        return
    raise KeyboardInterrupt


def _can_install() -> bool:
    return threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler


@contextlib.contextmanager
def stop_on_ctrl_c() -> Iterator[StopState]:
    """Turn the first Ctrl-C into a stop request for the block (see the module docstring).

    Installs the handler only in the main thread and only over Python's default handler; nested blocks
    share the outer one's state. Elsewhere it yields a state that no Ctrl-C changes.
    """
    global _active
    if _active is not None:
        yield _active
        return
    if not _can_install():
        yield StopState()
        return
    state = StopState()
    _active = state
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)
        _active = None


def stop_requested() -> bool:
    """Whether a Ctrl-C asked the active :func:`stop_on_ctrl_c` block to stop."""
    return _active is not None and _active.requested


@contextlib.contextmanager
def protected() -> Iterator[None]:
    """A block no Ctrl-C cuts (checkpoint reads and writes): a Ctrl-C that would raise waits until the block
    is done (or failed), then raises ``KeyboardInterrupt``; a first Ctrl-C under :func:`stop_on_ctrl_c` stays
    a request.

    Outside the main thread (where no signal handler runs) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with contextlib.ExitStack() as stack:
        if _active is None and _can_install():
            stack.enter_context(stop_on_ctrl_c()).immediate = True  # no loop here to act on a request
        state = _active
        if state is None:  # someone else's SIGINT handler: leave it alone
            yield
            return
        state.protected += 1
        try:
            yield
        finally:
            state.protected -= 1
            if state.held and not state.protected:  # also over an error of the block: the user wants out
                state.held = False
                raise KeyboardInterrupt  # noqa: B012
