"""One real training step measured without allocating: the model, optimizer and a batch on fake tensors
(``FakeTensorMode``) under torch's memory tracker (``torch.distributed._tools.mem_tracker.MemTracker``),
as torchtitan's memory estimation does.

The step is the one ``sapwood train`` runs for the same options (:mod:`sapwood.train.optim`,
:mod:`sapwood.train.chunked_loss`, activation checkpointing on every block, bf16 autocast or pure
bf16). It runs on the CPU device: a CPU-only torch cannot initialise fake CUDA modules, and the
tracked bytes do not depend on the device. Attention is ``scaled_dot_product_attention``, whose CPU
kernel is the fused flash-attention one: it keeps the output and the log-sum-exp rows, never the
``s x s`` matrix (checked by the tests). Two steps run and the second is reported, so the optimizer
state exists; the tracker's peak splits into parameters, gradients, optimizer state, activations
(saved for backward), temporaries and inputs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sapwood.config import Config
from sapwood.errors import ConfigError

CATEGORIES = {
    "PARAM": "params", "BUFFER": "buffers", "GRAD": "grads", "OPT": "optimizer", "ACT": "activations",
    "TEMP": "temporaries", "INP": "inputs", "OTH": "other",
}


@dataclass
class MeasuredStep:
    """Bytes at the peak of a training step, by kind, and the seconds the measurement took."""

    params: int = 0
    buffers: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    inputs: int = 0
    other: int = 0
    total: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_training_step(
    config: Config, precision: str = "bf16-pure", optimizer: str = "adamw8bit", checkpointing: str = "full",
    seq: int | None = None, micro_batch: int = 1, optimizer_in_backward: bool = False,
    loss_chunk: int | None = None,
) -> MeasuredStep:
    """Peak memory of a training step of ``config.model`` (one process) with these options."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from sapwood.model.transformer import Decoder
    from sapwood.train.activation import apply_activation_checkpointing
    from sapwood.train.chunked_loss import lm_loss_chunked
    from sapwood.train.optim import OptimizerInBackward, make_optimizer, parameter_groups
    from sapwood.train.precision import DTYPES, cast_parameters

    if getattr(config, "cube", None) is not None:
        raise ConfigError(
            "sapwood size --measure measures the language model (Decoder) configs; this one is a "
            "cube surrogate"
        )
    if checkpointing not in ("none", "full"):
        raise ConfigError(
            f"--checkpointing {checkpointing} cannot be measured; use none or full (every block)"
        )
    cfg = config.model
    seq = seq or cfg.trained_context
    started = time.perf_counter()
    _warm_code_books()
    betas = (0.9, 0.95)
    device = torch.device("cpu")
    autocast = (torch.autocast("cpu", dtype=DTYPES[precision]) if precision in ("bf16", "fp16")
                else contextlib.nullcontext())
    with FakeTensorMode():
        model = Decoder(cfg)
        apply_activation_checkpointing(model, "every_layer" if checkpointing == "full" else "none")
        if precision == "bf16-pure":
            cast_parameters(model, torch.bfloat16)
        if optimizer_in_backward:
            opt = OptimizerInBackward(model, optimizer, precision, device, 1e-4, betas, 0.1)
            optimizers = opt.optimizers
        else:
            opt = make_optimizer(parameter_groups(model, 0.1), optimizer, precision, device, 1e-4, betas)
            optimizers = [opt]
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        tracker = _peak_tracker(MemTracker)()
        tracker.track_external(model, *optimizers)
        with tracker, fused_attention():
            for step in range(2):
                with autocast:
                    if loss_chunk is not None:
                        loss = lm_loss_chunked(model, inputs, targets, loss_chunk)
                    else:
                        loss = F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())
                stepping = opt.stepping(True) if optimizer_in_backward else contextlib.nullcontext()
                with stepping:
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
                if step == 0:
                    tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")
    measured = MeasuredStep(seconds=round(time.perf_counter() - started, 1))
    for _device, by_kind in peak.items():
        for kind, value in by_kind.items():
            name = str(kind).split(".")[-1]
            if name == "Total":
                measured.total += int(value)
            elif name in CATEGORIES:
                setattr(measured, CATEGORIES[name], getattr(measured, CATEGORIES[name]) + int(value))
    return measured


def _peak_tracker(base: type) -> type:
    """``MemTracker`` that keeps the whole-step peak only. After every op the stock tracker also walks
    every module it has seen to update per-module peaks: O(ops x modules), i.e. quadratic in the
    layer count, which made the 56-layer step take most of an hour here. The global peak it keeps is
    the same (the per-module figures are not reported)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    class PeakTracker(base):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(dev_snap)

    return PeakTracker


def _warm_code_books() -> None:
    """torchao builds its quantization code books with data-dependent ops (impossible on fake
    tensors) and caches them: build them once on real tensors first."""
    from torchao.optim import subclass_4bit, subclass_8bit

    for module in (subclass_8bit, subclass_4bit):
        module.get_qmap_signed()
        module.get_qmap_unsigned()


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """``scaled_dot_product_attention`` through the CPU flash-attention kernel: it keeps the output and
    the log-sum-exp rows for backward, as the CUDA flash / memory-efficient kernels do."""
    if attn_mask is not None:
        raise ConfigError(
            "the measured step has an attention mask; the fused kernels take causal masking only"
        )
    if enable_gqa and key.shape[1] != query.shape[1]:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out, _logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale)
    return out


@contextlib.contextmanager
def fused_attention():
    """Within it, ``F.scaled_dot_product_attention`` is the flash kernel. On fake tensors the CPU
    dispatcher may pick the math kernel, which would keep an ``s x s`` score matrix per head; a GPU
    run uses flash or memory-efficient attention (asserted by ``sapwood.train`` on CUDA)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
