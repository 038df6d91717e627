"""What a training run tells the person at the terminal: one line per event, from rank 0 only."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)


def say(message: str, rank: int = 0) -> None:
    """Print ``message`` on rank 0 (other ranks of a distributed run stay quiet)."""
    if rank == 0:
        console.print(message, markup=False, soft_wrap=True)
