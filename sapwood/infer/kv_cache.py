"""A KV cache bounded by a byte budget, with one row per running request (implements ``KVCacheLike``).

Keys and values live in ``[rows, kv_heads, capacity, head_dim]`` tensors per layer. Running requests
always occupy rows ``0..n-1`` (a finished request's row is refilled by moving the last row into it), so
a decode step reads a view of the cache, never a gathered copy. Both dimensions are sized to need:
``rows`` to the running requests (rounded up to :data:`ROW_BLOCK`), ``capacity`` to the longest running
request (prompt + max new tokens, rounded up to :data:`POSITION_BLOCK`). The cache grows when requests
are admitted and shrinks back when long requests finish. :class:`KVBudget` is the one formula for the
bytes an allocation takes; the scheduler admits only what it allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_BLOCK = 4
POSITION_BLOCK = 64


class KVBudgetError(Exception):
    """A request needs more KV-cache memory than the whole budget (it could never run)."""


def _round_up(value: int, block: int) -> int:
    return -(-value // block) * block


@dataclass(frozen=True)
class KVBudget:
    """Bytes of a cache allocation and whether it fits ``max_bytes`` (pure arithmetic, no tensors)."""

    bytes_per_position: int  # keys + values of every layer for one token
    max_rows: int
    max_capacity: int
    max_bytes: int

    @classmethod
    def for_model(cls, cfg, dtype: torch.dtype, max_rows: int, max_bytes: int) -> KVBudget:
        per_position = 2 * cfg.layers * cfg.kv_heads * cfg.head_dim * dtype.itemsize
        return cls(per_position, max_rows, cfg.max_context, max_bytes)

    def shape(self, rows: int, longest: int) -> tuple[int, int]:
        """(rows, capacity) allocated for ``rows`` requests of which the longest reaches ``longest``."""
        if rows == 0:
            return 0, 0
        return (
            min(_round_up(rows, ROW_BLOCK), self.max_rows),
            max(longest, min(_round_up(longest, POSITION_BLOCK), self.max_capacity)),
        )

    def bytes_for(self, rows: int, longest: int) -> int:
        allocated_rows, capacity = self.shape(rows, longest)
        return allocated_rows * capacity * self.bytes_per_position

    def fits(self, rows: int, longest: int) -> bool:
        return self.bytes_for(rows, longest) <= self.max_bytes

    def longest_alone(self) -> int:
        """The most positions (prompt + max_tokens) one request may have and still fit the budget alone."""
        rows = self.shape(1, 1)[0]
        room = self.max_bytes // (rows * self.bytes_per_position)
        return self.max_capacity if room >= self.max_capacity else room // POSITION_BLOCK * POSITION_BLOCK

    def check_alone(self, positions: int) -> None:
        """Raise :class:`KVBudgetError` when one request of ``positions`` positions can never fit."""
        needed = self.bytes_for(1, positions)
        if needed > self.max_bytes:
            raise KVBudgetError(
                f"the request needs {needed / 2**20:.1f} MiB of KV cache ({positions} positions); the "
                f"server's "
                f"KV budget is {self.max_bytes / 2**20:.1f} MiB (--kv-memory-gb), room for "
                f"{self.longest_alone()} "
                f"positions at {self.bytes_per_position:,} bytes each; lower max_tokens or the prompt"
            )


def default_kv_bytes(device: torch.device, fraction: float = 0.5) -> int:
    """Half the memory free now on ``device`` (after the model is loaded)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    import psutil

    return int(psutil.virtual_memory().available * fraction)


class SlotKVCache:
    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, budget: KVBudget, dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.budget = budget
        self.dtype, self.device = dtype, torch.device(device)
        self.rows = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._step: tuple[int, int, torch.Tensor | None, int, torch.Tensor | None] | None = None
        self.peak_bytes = 0

    # --- sizing -------------------------------------------------------------------------------
    def fit(self, rows: int, longest: int, shrink: bool = True) -> None:
        """Hold ``rows`` requests up to ``longest`` positions: grow when short of it; with ``shrink``, give
        memory back when the allocation is more than twice what is needed. Rows ``0..rows-1`` keep their
        contents. Resizing goes one layer at a time, so the transient extra memory is one layer's tensors."""
        want_rows, want_capacity = self.budget.shape(rows, longest)
        grow = want_rows > self.rows or want_capacity > self.capacity
        too_big = self.rows * self.capacity > 2 * want_rows * want_capacity
        if not grow and not (shrink and too_big):
            return
        keep_rows, keep_capacity = min(rows, self.rows), min(self.capacity, want_capacity)
        shape = (want_rows, self.kv_heads, want_capacity, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(self.layers):
                resized = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    resized[:keep_rows, :, :keep_capacity] = store[i][:keep_rows, :, :keep_capacity]
                    store[i] = resized
                else:
                    store.append(resized)
        self.rows, self.capacity = want_rows, want_capacity
        self.peak_bytes = max(self.peak_bytes, self.bytes_allocated)

    @property
    def bytes_allocated(self) -> int:
        return self.rows * self.capacity * self.budget.bytes_per_position

    def move_slot(self, source: int, target: int) -> None:
        """Copy row ``source`` into row ``target`` (used to keep running rows contiguous)."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target].copy_(tensor[source])

    # --- one forward pass -------------------------------------------------------------------
    def begin_prefill(self, first_row: int, rows: int, seq: int) -> None:
        """Rows ``first_row..+rows`` start from position 0 and get ``seq`` (padded) tokens: plain causal."""
        if first_row + rows > self.rows or seq > self.capacity:
            raise RuntimeError(
                f"prefill of rows {first_row}..{first_row + rows} x {seq} positions outside the "
                f"cache ({self.rows} x {self.capacity})"
            )
        self._step = (first_row, rows, None, seq, None)

    def begin_decode(self, positions: torch.Tensor, kv_len: int, uniform: bool) -> None:
        """Rows ``0..len(positions)-1`` each get one token at their own position (``kv_len`` = largest + 1;
        ``uniform``: every row is at the same position)."""
        rows = positions.shape[0]
        if rows > self.rows or kv_len > self.capacity:
            raise RuntimeError(
                f"decode of {rows} rows to {kv_len} positions outside the cache "
                f"({self.rows} x {self.capacity})"
            )
        mask = None
        if not uniform:
            keys = torch.arange(kv_len, device=self.device)
            mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
        self._step = (0, rows, positions, kv_len, mask)

    def update(
        self, layer_index: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self._step is None:
            raise RuntimeError("SlotKVCache.update called outside begin_prefill/begin_decode")
        first, rows, positions, kv_len, mask = self._step
        key_rows = self.keys[layer_index][first : first + rows]
        value_rows = self.values[layer_index][first : first + rows]
        if positions is None:
            seq = k.shape[2]
            key_rows[:, :, :seq] = k
            value_rows[:, :, :seq] = v
        else:
            batch_index = torch.arange(rows, device=self.device)
            key_rows[batch_index, :, positions] = k[:, :, 0]
            value_rows[batch_index, :, positions] = v[:, :, 0]
        return key_rows[:, :, :kv_len], value_rows[:, :, :kv_len], mask
