"""Growth methods: masked growth is exact at mask 0 and ramps to the plain grown model,
G_stack repeats the whole small stack, FFN splitting with noise preserves the function, and the optimizer
state follows each of them."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from sapwood.config import ModelConfig
from sapwood.grow.masked import grow_model_masked
from sapwood.grow.operators import split_ffn, stack_depth
from sapwood.grow.optimizer import apply_changes_to_optimizer, check_optimizer_matches
from sapwood.grow.plan import GrowthRequest
from sapwood.model.transformer import Decoder


def small_model(layers: int = 2) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, hidden=32, layers=layers, heads=2, kv_heads=1, ffn=48, head_dim=16, trained_context=16,
        tied_embeddings=True,
    )
    return Decoder(cfg)


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def adamw(model: Decoder) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, optimizer, data, steps, masks=None):
    for _ in range(steps):
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if masks is not None:
            masks.step()


FULL = GrowthRequest(layers=4, hidden=64, ffn=96, heads=4, kv_heads=2)


def test_masked_growth_is_exact_at_mask_zero_and_new_weights_are_normal():
    model, data = small_model(), tokens()
    optimizer = adamw(model)
    train(model, optimizer, data, 2)
    with torch.no_grad():
        before = model(data)
    masks, _ = grow_model_masked(
        model, FULL, ramp_steps=4, optimizer=optimizer, generator=torch.Generator().manual_seed(2)
    )
    assert (model.cfg.layers, model.cfg.hidden, model.cfg.ffn, model.cfg.heads) == (4, 64, 96, 4)
    with torch.no_grad():
        after = model(data)
    assert (after - before).abs().max().item() < 1e-6
    # new parts are random, not zero: new blocks' outputs, new FFN columns, new hidden rows of w2
    new_block = model.layers["1"]  # "evenly" puts the new blocks after blocks 0 and 1
    assert new_block.attention.wo.weight.std() > 1e-3 and new_block.feed_forward.w2.weight.std() > 1e-3
    w2 = model.layers["0"].feed_forward.w2.weight
    assert w2[:, 48:].std() > 1e-3 and w2[32:, :].std() > 1e-3
    assert check_optimizer_matches(optimizer, model) == []


def test_mask_ramps_then_hooks_go_and_the_model_is_the_plain_grown_one():
    model, data = small_model(), tokens()
    optimizer = adamw(model)
    masks, _ = grow_model_masked(
        model, FULL, ramp_steps=3, optimizer=optimizer, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        at_zero = model(data)
        masks.value = 0.5
        at_half = model(data)
        masks.value = 0.0
    assert (at_half - at_zero).abs().max() > 1e-4  # the new parts take part once the mask opens
    train(model, optimizer, data, 2, masks)
    assert masks.value == 2 / 3 and masks.active
    train(model, optimizer, data, 1, masks)
    assert masks.value == 1.0 and not masks.active
    with torch.no_grad():
        with_hooks_gone = model(data)
        for hooks in (m._forward_hooks for m in model.modules()):
            assert len(hooks) == 0
        assert torch.isfinite(with_hooks_gone).all()
    assert check_optimizer_matches(optimizer, model) == []
    assert all(optimizer.state[p]["step"] > 0 for p in model.parameters())


def test_mask_ramp_does_not_recompile_compiled_blocks():
    """The mask is a tensor changed in place, so a compiled block (dynamo) compiles once per hook layout
    and the ramp's new values reuse those graphs; the compiled model computes what the eager one does."""
    from torch._dynamo.utils import counters

    model, data = small_model(), tokens()
    masks, _ = grow_model_masked(model, FULL, ramp_steps=4, generator=torch.Generator().manual_seed(2))
    eager = copy.deepcopy(model)  # deep copies keep their own hooks, on the same masks
    torch._dynamo.reset()
    counters.clear()
    try:
        for name, block in list(model.layers.items()):
            model.layers[name] = torch.compile(block, backend="eager")
        with torch.no_grad():
            model(data)
            graphs = counters["stats"]["unique_graphs"]
            for _ in range(3):
                masks.step()
                assert (model(data) - eager(data)).abs().max() < 1e-6, masks.value
        assert 0 < masks.value < 1 and counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


def test_gstack_repeats_the_whole_stack():
    model = small_model(layers=2)
    originals = [{k: v.clone() for k, v in model.layers[str(i)].state_dict().items()} for i in range(2)]
    optimizer = adamw(model)
    train(model, optimizer, tokens(), 1)
    originals = [{k: v.clone() for k, v in model.layers[str(i)].state_dict().items()} for i in range(2)]
    changes = stack_depth(model, 8)  # growth factor g = 4 as in Du et al. (2024)
    apply_changes_to_optimizer(optimizer, changes, model)
    assert model.cfg.layers == 8 and len(model.layers) == 8
    for k in range(4):
        for i in range(2):
            block = model.layers[str(2 * k + i)]
            for name, value in block.state_dict().items():
                assert torch.equal(value, originals[i][name]), (k, i, name)
            if k:  # copies are distinct tensors, trained independently from here on
                assert (
                    block.attention.wq.weight.data_ptr()
                    != model.layers[str(i)].attention.wq.weight.data_ptr()
                )
    assert check_optimizer_matches(optimizer, model) == []
    new_param = model.layers["5"].feed_forward.w1.weight
    assert torch.count_nonzero(optimizer.state[new_param]["exp_avg"]) == 0  # fresh moments for copies
    train(model, optimizer, tokens(), 1)


def test_gstack_rejects_a_non_multiple():
    import pytest

    from sapwood.errors import SapwoodError

    with pytest.raises(SapwoodError, match="layers=5 is not a multiple of the current 2"):
        stack_depth(small_model(), 5)


def test_split_ffn_preserves_the_function_breaks_symmetry_and_carries_state():
    model, data = small_model(), tokens()
    optimizer = adamw(model)
    train(model, optimizer, data, 2)
    old_w1 = model.layers["0"].feed_forward.w1.weight.detach().clone()
    old_moment = optimizer.state[model.layers["0"].feed_forward.w1.weight]["exp_avg"].clone()
    with torch.no_grad():
        before = model(data)
    changes = split_ffn(model, 80, noise=1e-2, generator=torch.Generator().manual_seed(3))
    apply_changes_to_optimizer(optimizer, changes, model)
    with torch.no_grad():
        after = model(data)
    assert (after - before).abs().max().item() < 1e-5
    w1 = model.layers["0"].feed_forward.w1
    assert torch.equal(w1.weight[:48], old_w1)
    new_rows = w1.weight[48:]  # each new unit is a copy of an existing one
    assert all(any(torch.equal(row, old) for old in old_w1) for row in new_rows)
    state = optimizer.state[w1.weight]["exp_avg"]
    assert torch.equal(state[:48], old_moment) and torch.count_nonzero(state[48:]) == 0
    # after one step the copies differ from their sources (noise broke the symmetry)
    train(model, optimizer, data, 1)
    trained = w1.weight.detach()
    assert not any(torch.equal(trained[48], trained[j]) for j in range(48))


def test_split_ffn_more_than_doubling_still_preserves_the_function():
    model, data = small_model(), tokens()
    with torch.no_grad():
        before = model(data)
    split_ffn(model, 48 * 3 + 5, noise=1e-2, generator=torch.Generator().manual_seed(4))
    assert model.layers["1"].feed_forward.w2.weight.shape == (32, 149)
    with torch.no_grad():
        assert (model(data) - before).abs().max().item() < 1e-5
