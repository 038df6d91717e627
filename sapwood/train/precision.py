"""Mixed precision: autocast for matmuls, fp32 master weights, and a gradient scaler for fp16.

Parameters and optimizer state stay float32; ``autocast`` runs matmuls in bf16/fp16. RMSNorm is
computed in float32 inside the model and tasks compute their loss on ``logits.float()``.
fp16 uses ``torch.amp.GradScaler``: an overflowing step is skipped and the scale halves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device_type: str):
        self.name = name
        self.dtype = DTYPES[name]
        self.device_type = device_type

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.name == "fp32":
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled only for fp16 (bf16 has fp32's exponent range and needs no scaling)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")
