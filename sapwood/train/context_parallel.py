"""Context parallelism: the sequence split over the ``cp`` mesh dimension, attention as an exact ring.

**Load-balanced causal sharding.** A sequence of ``S`` positions is cut into ``2 * cp`` equal chunks;
cp rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r`` (an early and a late one), so every rank has the
same number of causal query-key pairs to compute (with ``r`` alone, the last rank would do most of the
work). :func:`shard_positions` names the global positions a rank holds; rotary embeddings use them.

**Ring attention** (Liu et al. 2023, "Ring Attention with Blockwise Transformers"). Each rank keeps its
queries; the key/value blocks travel round the ring of cp ranks (``isend`` to the next, ``irecv`` from
the previous, the next block in flight while this one is computed). Every block's partial softmax is
merged by its log-sum-exp (online softmax), so the result is exact attention over the whole sequence,
not an approximation. Backward runs the ring again: the blocks travel with their key/value gradient
accumulators, which arrive back at their owner after ``cp`` hops. A block no query of this rank may
see (all of its keys lie in the causal future) is skipped. Runs on any backend with point-to-point
sends (gloo on the CPU, NCCL on GPUs).

torch's own ``torch.distributed.tensor.experimental.context_parallel`` handles the CUDA SDPA kernels
(flash, efficient, cuDNN) only: on CPU gloo (torch 2.13) it fails with "Operator
aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy registered".
This module is the implementation sapwood uses on every device.

**The model hooks** (:func:`apply_context_parallel`): a forward pre-hook shards the tokens of a full
batch ``[batch, S]`` to the rank's ``[batch, S / cp]`` and passes their global positions; each attention
layer runs the ring; a forward hook gathers the logits back to ``[batch, S, vocab]`` in sequence order,
so the loss, the evaluation and the training loop see the same logits as without context parallelism.
Every cp rank computes the same loss on the same gathered logits, so the gradient a reduce-scatter of
the gathered logits' gradients would return is ``cp`` times this rank's own slice; FSDP then averages
the parameter gradients over the ``dp_shard x cp`` ranks it shards across.

**Memory.** Activations and attention per rank are divided by ``cp``; the loss is not: the gathered
``[batch, S, vocab]`` logits (and the loss's fp32 copy and gradient of them) are whole on every cp rank,
as in one process (``sizing.memory.memory_plan`` counts them so). At long ``S`` with a large vocabulary they
dominate: research-799m at 131,072 tokens holds 41.9 GB of logits per rank at any ``cp``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from sapwood.errors import ConfigError


def shard_positions(seq_len: int, cp: int, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Global positions (LongTensor ``[seq_len / cp]``) held by cp rank ``rank``: chunks ``rank`` and
    ``2 cp - 1 - rank`` of ``2 cp`` equal chunks."""
    check_divisible(seq_len, cp)
    chunk = seq_len // (2 * cp)
    early = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    late = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat((early, late))


def check_divisible(seq_len: int, cp: int) -> None:
    if seq_len % (2 * cp):
        raise ConfigError(
            f"sequence length {seq_len} is not divisible by 2 x parallel.cp = {2 * cp}; "
            "context parallelism splits each sequence into 2 x cp equal chunks"
        )


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """The positions of ``x`` (full length along ``dim``) that cp rank ``rank`` holds."""
    return x.index_select(dim, shard_positions(x.shape[dim], cp, rank, x.device))


def unshard_sequence(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The full sequence from every cp rank's shard (``parts[r]`` from rank ``r``), in position order."""
    cp = len(parts)
    halves = [part.chunk(2, dim=dim) for part in parts]
    return torch.cat([halves[r][0] for r in range(cp)] + [halves[r][1] for r in reversed(range(cp))], dim=dim)


# --- ring attention -------------------------------------------------------------------------------


class Ring:
    """The cp process group of one rank: its position in the ring and the neighbours' global ranks."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.previous = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start_shift(self, tensor: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Send ``tensor`` to the next rank and receive the previous rank's into a new buffer (started
        now; :meth:`finish` waits)."""
        received = torch.empty_like(tensor)
        works = [
            dist.isend(tensor, self.next, group=self.group),
            dist.irecv(received, self.previous, group=self.group),
        ]
        return received, works

    @staticmethod
    def finish(works: list) -> None:
        for work in works:
            work.wait()


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[sq, sk]`` True where query position may attend to key position (causal, optional window)."""
    mask = q_pos[:, None] >= k_pos[None, :]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def _expand(kv: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: key/value heads repeated for their query heads (as SDPA's ``enable_gqa``)."""
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _reduce(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Gradient of :func:`_expand`: sum over the query heads sharing a key/value head."""
    if groups == 1:
        return grad
    batch, heads, seq, dim = grad.shape
    return grad.view(batch, heads // groups, groups, seq, dim).sum(2)


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(buffer: torch.Tensor, like: torch.Tensor, count: int) -> list[torch.Tensor]:
    return [piece.view_as(like) for piece in buffer.split(like.numel())[:count]]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, ring, window):
        rank, size = ring.rank, ring.size
        groups = q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        q32 = q.float()
        out = torch.zeros_like(q32)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=torch.float32, device=q.device)
        block = _pack(k.float(), v.float())
        q_pos = positions[rank]
        for step in range(size):
            works = []
            if step < size - 1:
                incoming, works = ring.start_shift(block)
            source = (rank - step) % size
            visible = _visible(q_pos, positions[source], window)
            if visible.any():
                k_blk, v_blk = _unpack(block, k, 2)
                scores = (q32 @ _expand(k_blk, groups).transpose(-1, -2)) * scale
                scores = scores.masked_fill(~visible, -math.inf)
                row_max = scores.amax(-1, keepdim=True)
                row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
                weights = (scores - row_max).exp()
                total = weights.sum(-1, keepdim=True)
                block_out = (weights @ _expand(v_blk, groups)) / total.clamp_min(
                    torch.finfo(torch.float32).tiny
                )
                block_lse = (row_max + total.log()).squeeze(-1)
                merged = torch.logaddexp(lse, block_lse)
                safe = torch.where(torch.isfinite(merged), merged, torch.zeros_like(merged))
                out = out * (lse - safe).exp()[..., None] + block_out * (block_lse - safe).exp()[..., None]
                lse = merged
            if works:
                ring.finish(works)
                block = incoming
        ctx.save_for_backward(q, k, v, out, lse, positions)
        ctx.ring, ctx.window = ring, window
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, positions = ctx.saved_tensors
        ring, window = ctx.ring, ctx.window
        rank, size = ring.rank, ring.size
        groups = q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        q32, dout = q.float(), grad_out.float()
        delta = (dout * out).sum(-1, keepdim=True)
        dq = torch.zeros_like(q32)
        k32 = k.float()
        block = _pack(k32, v.float(), torch.zeros_like(k32), torch.zeros_like(k32))
        q_pos = positions[rank]
        for step in range(size):
            source = (rank - step) % size
            visible = _visible(q_pos, positions[source], window)
            if visible.any():
                k_blk, v_blk, dk_blk, dv_blk = _unpack(block, k, 4)
                k_full = _expand(k_blk, groups)
                scores = (q32 @ k_full.transpose(-1, -2)) * scale
                probs = (scores - lse[..., None]).exp().masked_fill(~visible, 0.0)
                dv_blk += _reduce(probs.transpose(-1, -2) @ dout, groups)
                dscores = probs * (dout @ _expand(v_blk, groups).transpose(-1, -2) - delta) * scale
                dq += dscores @ k_full
                dk_blk += _reduce(dscores.transpose(-1, -2) @ q32, groups)
            # every hop, the last one included: the gradient accumulators must get back to their owner
            incoming, works = ring.start_shift(block)
            ring.finish(works)
            block = incoming
        _, _, dk, dv = _unpack(block, k, 4)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, ring: Ring,
    window: int | None = None,
) -> torch.Tensor:
    """Exact causal attention of this rank's queries over the keys of every rank in ``ring``.

    ``q`` ``[batch, heads, s, head_dim]``, ``k``/``v`` ``[batch, kv_heads, s, head_dim]`` (GQA when fewer
    heads); ``positions`` ``[cp, s]``: the global positions each cp rank holds (row ``ring.rank`` are
    this rank's). ``window``: each query sees only the last ``window`` positions, itself included.
    Softmax scale ``1 / sqrt(head_dim)`` as SDPA; computed in float32, returned in ``q``'s dtype."""
    return _RingAttention.apply(q, k, v, positions, ring, window)


# --- the model -------------------------------------------------------------------------------------


class ContextParallel:
    """What a context-parallel attention layer calls instead of SDPA (``Attention.context_parallel``).
    The positions every rank holds follow from the local length alone (no per-forward state, so an
    activation-checkpointed block recomputed in backward sees the same ones)."""

    def __init__(self, ring: Ring):
        self.ring = ring
        self._positions: dict[tuple[int, str], torch.Tensor] = {}

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """``[cp, local_len]``: the global positions of every cp rank for sequences of ``local_len x cp``."""
        key = (local_len, str(device))
        if key not in self._positions:
            seq_len = local_len * self.ring.size
            self._positions[key] = torch.stack(
                [shard_positions(seq_len, self.ring.size, r, device) for r in range(self.ring.size)]
            )
        return self._positions[key]

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        return ring_attention(q, k, v, self.positions(q.shape[2], q.device), self.ring, window)


class _GatherSequence(torch.autograd.Function):
    """All-gather the cp shards of ``[batch, s, ...]`` into the full sequence; backward keeps this rank's
    slice of the gradient times ``cp`` (every cp rank backpropagates the same loss)."""

    @staticmethod
    def forward(ctx, local, ring):
        parts = [torch.empty_like(local) for _ in range(ring.size)]
        dist.all_gather(parts, local.contiguous(), group=ring.group)
        ctx.ring = ring
        return unshard_sequence(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        ring = ctx.ring
        return shard_sequence(grad, ring.size, ring.rank, dim=1) * ring.size, None


def _shard_inputs_hook(context: ContextParallel) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) != 1 or any(
            kwargs.get(name) is not None for name in ("positions", "kv_cache", "rope", "logits_at")
        ):
            raise ConfigError(
                "a context-parallel model takes whole token batches only (no positions, KV cache, "
                "rope or logits_at); serve or score the consolidated checkpoint instead"
            )
        tokens = args[0]
        ring = context.ring
        local = shard_sequence(tokens, ring.size, ring.rank, dim=1)
        positions = context.positions(local.shape[1], tokens.device)[ring.rank]
        return (local,), dict(kwargs, positions=positions.unsqueeze(0))

    return hook


def _gather_output_hook(context: ContextParallel) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return _GatherSequence.apply(output, context.ring)

    return hook


def apply_context_parallel(model: nn.Module, cp_group: dist.ProcessGroup) -> ContextParallel:
    """Make ``model`` (a Decoder) context-parallel over ``cp_group``: it takes full ``[batch, S]`` token
    batches (the same on every cp rank) and returns the full ``[batch, S, vocab]`` logits, computing
    only ``S / cp`` positions per rank. Call before tensor parallel (its hooks run first)."""
    context = ContextParallel(Ring(cp_group))
    for block in model.layers.values():
        block.attention.context_parallel = context
    model.register_forward_pre_hook(_shard_inputs_hook(context), with_kwargs=True)
    model.register_forward_hook(_gather_output_hook(context), with_kwargs=True)
    return context
