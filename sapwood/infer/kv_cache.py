"""A preallocated KV cache with one row (slot) per running request, implementing ``KVCacheLike``.

Keys and values live in ``[slots, kv_heads, capacity, head_dim]`` tensors per layer. Running requests
always occupy rows ``0..n-1`` (a finished request's row is refilled by moving the last row into it), so
a decode step reads a view of the cache, never a gathered copy. ``capacity`` is sized to need: it grows
in blocks to the longest request running (prompt + max new tokens), never past ``max_capacity``.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_capacity: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        block: int = 64,
    ):
        self.layers, self.slots, self.kv_heads, self.head_dim = layers, slots, kv_heads, head_dim
        self.max_capacity, self.block = max_capacity, block
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._step: tuple[int, int, torch.Tensor | None, int, torch.Tensor | None] | None = None
        self.reserve(block)

    # --- sizing -------------------------------------------------------------------------------
    def reserve(self, tokens: int) -> None:
        """Make every slot hold at least ``tokens`` positions (rounded up to a block), keeping contents."""
        if tokens <= self.capacity:
            return
        capacity = min(-(-tokens // self.block) * self.block, self.max_capacity)
        capacity = max(capacity, tokens)
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(self.layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    grown[:, :, : self.capacity] = store[i]
                    store[i] = grown
                else:
                    store.append(grown)
        self.capacity = capacity

    @property
    def bytes_allocated(self) -> int:
        return 2 * self.layers * self.slots * self.kv_heads * self.capacity * self.head_dim * self.dtype.itemsize

    def move_slot(self, source: int, target: int) -> None:
        """Copy row ``source`` into row ``target`` (used to keep running rows contiguous)."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target].copy_(tensor[source])

    # --- one forward pass -------------------------------------------------------------------
    def begin_prefill(self, first_row: int, rows: int, seq: int) -> None:
        """Rows ``first_row..+rows`` start from position 0 and get ``seq`` (padded) tokens: plain causal."""
        self.reserve(seq)
        self._step = (first_row, rows, None, seq, None)

    def begin_decode(self, positions: torch.Tensor) -> None:
        """Rows ``0..len(positions)-1`` each get one token at their own position."""
        rows = positions.shape[0]
        kv_len = int(positions.max()) + 1
        self.reserve(kv_len)
        mask = None
        if bool((positions != positions[0]).any()):
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
