"""Reusable CPU tensors: large fresh allocations cost page faults that are often dearer than the work done in
them.

A :class:`BufferPool` hands a buffer out again only when nothing references it any more: every tensor or view
made from it holds a reference to the underlying numpy array, so ``sys.getrefcount`` tells whether a tensor
handed out earlier (or any view of it) is still alive. Used by the cube loader (frame buffers) and
augmentation (outputs).
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch


class BufferPool:
    """Up to ``capacity`` float32 buffers per shape; beyond that, fresh (unpooled) tensors."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self.buffers: dict[tuple[int, ...], list[np.ndarray]] = {}
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 CPU tensor of ``shape`` whose memory no live tensor uses (contents undefined)."""
        with self.lock:
            pool = self.buffers.setdefault(tuple(shape), [])
            for buffer in pool:
                if sys.getrefcount(buffer) <= 3:  # the list, the loop variable, the call's argument
                    return torch.from_numpy(buffer)
            buffer = np.empty(shape, dtype=np.float32)
            if len(pool) < self.capacity:
                pool.append(buffer)
            return torch.from_numpy(buffer)
