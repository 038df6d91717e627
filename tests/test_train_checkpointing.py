"""Activation checkpointing: same gradients as without it, and it covers the blocks it should."""

from __future__ import annotations

import copy

import pytest
import torch

from sapwood.config import ModelConfig
from sapwood.model.transformer import Decoder
from sapwood.train.activation import apply_activation_checkpointing, checkpointed_block_names

CFG = ModelConfig(vocab_size=97, hidden=32, layers=5, heads=4, kv_heads=2, ffn=64, trained_context=16)


def gradients(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def count_attention_calls(model: torch.nn.Module) -> dict[str, int]:
    """Forward calls of each block's attention module (a recomputed block calls it twice per step)."""
    calls = dict.fromkeys(model.layers, 0)
    for name, block in model.layers.items():
        def hook(module, args, name=name):
            calls[name] += 1
        block.attention.register_forward_pre_hook(hook)
    return calls


@pytest.fixture
def models():
    torch.manual_seed(0)
    plain = Decoder(CFG)
    return plain, copy.deepcopy(plain)


def test_every_layer_gives_the_same_gradients_and_recomputes_every_block(models):
    plain, checkpointed = models
    assert apply_activation_checkpointing(checkpointed, "every_layer") == ["0", "1", "2", "3", "4"]
    tokens = torch.randint(0, CFG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    calls = count_attention_calls(checkpointed)
    expected = gradients(plain, tokens)
    got = gradients(checkpointed, tokens)
    assert calls == dict.fromkeys(calls, 2)  # forward + recomputation in backward, every block
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7, msg=name)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # names unchanged


def test_every_k_recomputes_exactly_the_chosen_blocks(models):
    _, checkpointed = models
    assert apply_activation_checkpointing(checkpointed, "every_k", every_k=2) == ["0", "2", "4"]
    calls = count_attention_calls(checkpointed)
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))
    gradients(checkpointed, tokens)
    assert calls == {"0": 2, "1": 1, "2": 2, "3": 1, "4": 2}


def test_no_recomputation_without_grad_and_idempotent_after_growth(models):
    _, checkpointed = models
    apply_activation_checkpointing(checkpointed, "every_layer")
    calls = count_attention_calls(checkpointed)
    with torch.no_grad():
        checkpointed(torch.randint(0, CFG.vocab_size, (1, 5)))
    assert calls == dict.fromkeys(calls, 1)
    checkpointed.layers["5"] = copy.deepcopy(checkpointed.layers["4"])  # a depth-growth-style new block
    fresh = Decoder(CFG).layers["0"]
    checkpointed.layers["6"] = fresh
    assert apply_activation_checkpointing(checkpointed, "every_layer") == [str(i) for i in range(7)]
    assert checkpointed_block_names(checkpointed) == [str(i) for i in range(7)]
    calls = count_attention_calls(checkpointed)
    gradients(checkpointed, torch.randint(0, CFG.vocab_size, (1, 5)))
    assert calls == dict.fromkeys(calls, 2)  # the copied block recomputes itself, not the original
