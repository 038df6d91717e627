"""Cross-entropy over the output head in chunks of tokens, so the ``[tokens x vocab]`` fp32 logits
never exist at once.

Each chunk's logits are computed from the final hidden states, reduced to a summed loss and dropped;
``torch.utils.checkpoint`` keeps only the chunk's inputs (views of the hidden states and the head
weight, which are alive anyway) and recomputes that chunk's logits in backward, one chunk at a time.
So the extra memory is ``chunk x vocab`` logits (plus their fp32 copy), instead of
``tokens x vocab`` in the compute dtype, in fp32, and again for the softmax in backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, ``chunk`` tokens at a time.

    ``hidden``: ``[..., hidden]`` final (normed) hidden states; ``weight``: the head ``[vocab, hidden]``;
    ``targets``: ``[...]`` token ids. Equal to ``F.cross_entropy(F.linear(hidden, weight).float(), ...)``.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    total = flat_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_targets.numel(), chunk):
        stop = start + chunk
        total = total + checkpoint(_chunk_loss_sum, flat_hidden[start:stop], weight, flat_targets[start:stop],
                                   use_reentrant=False)
    return total / flat_targets.numel()


@contextlib.contextmanager
def head_detached(model: nn.Module) -> Iterator[nn.Module]:
    """Within it, ``model(tokens)`` returns the final normed hidden states (a Decoder without its
    ``output`` head returns them); yields the head."""
    head = model.output
    model.output = None
    try:
        yield head
    finally:
        model.output = head


def lm_loss_chunked(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Next-token loss of a Decoder with the head applied chunk by chunk."""
    with head_detached(model) as head:
        hidden = model(inputs)
    return chunked_cross_entropy(hidden, head.weight, targets, chunk)
