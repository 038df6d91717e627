"""Growth operators are exactly function-preserving, keep ties, and give one-line errors for bad requests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sapwood.config import GrowthCaps, ModelConfig
from sapwood.errors import SapwoodError
from sapwood.grow.operators import depth_insert_after, grow_depth, grow_ffn, grow_heads, grow_hidden
from sapwood.grow.plan import GrowthRequest, grow_model, params_of_shape, target_config
from sapwood.model.transformer import Decoder


def small_config(tied: bool = False, heads: int = 4, kv_heads: int = 2) -> ModelConfig:
    return ModelConfig(
        vocab_size=97, hidden=32, layers=2, heads=heads, kv_heads=kv_heads, ffn=48, trained_context=16,
        tied_embeddings=tied,
    )


def trained_like(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """A decoder with non-trivial norm gains (as after training), so the rescaling is really tested."""
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith(("wo.weight", "w2.weight")):
                param.normal_(0, 0.1)
    return model


def tokens(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(model: Decoder, request_fn) -> float:
    x = tokens(model.cfg)
    with torch.no_grad():
        before = model(x)
    request_fn(model)
    with torch.no_grad():
        after = model(x)
    return (after - before).abs().max().item()


OPERATORS = {
    "depth_end": lambda m: grow_depth(m, 4, "end"),
    "depth_middle": lambda m: grow_depth(m, 3, "middle"),
    "depth_evenly": lambda m: grow_depth(m, 4, "evenly"),
    "depth_stack": lambda m: grow_depth(m, 4, "evenly", init="stack"),
    "depth_start": lambda m: grow_depth(m, 3, [-1]),
    "ffn": lambda m: grow_ffn(m, 80),
    "heads_more_groups": lambda m: grow_heads(m, 8, 2),
    "kv_heads": lambda m: grow_heads(m, 8, 4),
    "heads_and_kv": lambda m: grow_heads(m, 12, 3),
    "hidden": lambda m: grow_hidden(m, 48),
    "all": lambda m: grow_model(m, GrowthRequest(layers=5, hidden=64, ffn=96, heads=8, kv_heads=2)),
    "all_stack": lambda m: grow_model(
        m,
        GrowthRequest(
            layers=4, hidden=40, ffn=64, heads=6, kv_heads=3, depth_init="stack", layer_position="end"
        ),
    ),
}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("operator", list(OPERATORS))
def test_operator_preserves_logits(operator: str, tied: bool) -> None:
    model = trained_like(small_config(tied=tied))
    diff = max_logit_diff(model, OPERATORS[operator])
    assert diff < 1e-5, f"{operator}: max abs logit diff {diff}"
    if tied:
        assert model.output.weight is model.tok_embeddings.weight


def test_mha_and_sequence_of_events_preserve_logits() -> None:
    model = trained_like(small_config(heads=4, kv_heads=4))
    x = tokens(model.cfg)
    with torch.no_grad():
        before = model(x)
    grow_hidden(model, 40)
    grow_depth(model, 3, "end")
    grow_heads(model, 8)
    grow_hidden(model, 64)
    grow_ffn(model, 50)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max().item() < 1e-5
    assert model.cfg.heads == 8 and model.cfg.kv_heads == 8 and model.cfg.layers == 3


def test_grown_model_has_the_grown_shape_and_exact_param_count() -> None:
    model = trained_like(small_config(tied=True))
    request = GrowthRequest(layers=5, hidden=64, ffn=96, heads=8, kv_heads=2)
    planned = target_config(model.cfg, request)
    grow_model(model, request)
    assert model.cfg == planned
    fresh = Decoder(model.cfg)
    for name, module in model.named_modules():
        if hasattr(module, "eps"):
            assert module.eps == fresh.get_submodule(name).eps == model.cfg.norm_eps
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, p.shape) for n, p in fresh.named_parameters()
    ]
    assert list(model.layers) == ["0", "1", "2", "3", "4"]
    assert sum(p.numel() for p in model.parameters()) == params_of_shape(model.cfg)
    assert model.cfg.head_dim == 8 and model.cfg.norm_eps == pytest.approx(1e-5 * 32 / 64)
    # the grown state dict loads into a model built from the new config: the checkpoint rebuilds this shape
    fresh.load_state_dict(model.state_dict())
    x = tokens(model.cfg)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_stack_copies_source_block_inputs_and_zeroes_outputs() -> None:
    model = trained_like(small_config())
    old_block = model.layers["0"]
    grow_depth(model, 4, "evenly", init="stack")
    # evenly with 2 new among 2 old: a copy after each old block
    copy = model.layers["1"]
    assert torch.equal(copy.attention.wq.weight, old_block.attention.wq.weight)
    assert copy.attention.wq.weight is not old_block.attention.wq.weight
    assert copy.attention.wo.weight.abs().sum() == 0 and copy.feed_forward.w2.weight.abs().sum() == 0


def test_depth_positions() -> None:
    assert depth_insert_after(4, 2, "end") == [3, 3]
    assert depth_insert_after(4, 1, "middle") == [1]
    assert depth_insert_after(4, 2, "evenly") == [1, 3]
    assert depth_insert_after(4, 4, "evenly") == [0, 1, 2, 3]
    with pytest.raises(SapwoodError, match="positions"):
        depth_insert_after(4, 2, [0, 9])


def test_random_init_of_new_parts_changes_the_function() -> None:
    model = trained_like(small_config())
    diff = max_logit_diff(
        model, lambda m: grow_model(m, GrowthRequest(hidden=48, ffn=64, layers=3, function_preserving=False))
    )
    assert diff > 1e-3


def test_new_parameters_get_gradients_and_learn() -> None:
    model = trained_like(small_config(tied=True))
    grow_model(model, GrowthRequest(layers=3, hidden=48, ffn=64, heads=8, kv_heads=2))
    x = tokens(model.cfg)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # zero output projections pass gradients on after the first update
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    new_block = model.layers["2"]
    for name, param in new_block.named_parameters():
        assert not torch.equal(param, snapshot[f"layers.2.{name}"]), f"new block param {name} did not move"
    for name in ("layers.0.feed_forward.w2.weight", "layers.0.attention.wo.weight", "tok_embeddings.weight"):
        new_part = (
            model.get_parameter(name)[32:] if "embeddings" not in name else model.get_parameter(name)[:, 32:]
        )
        old_new_part = snapshot[name][32:] if "embeddings" not in name else snapshot[name][:, 32:]
        assert not torch.equal(new_part, old_new_part), f"new rows of {name} did not move"
    w2 = model.get_parameter("layers.0.feed_forward.w2.weight")
    assert not torch.equal(w2[:, 48:], snapshot["layers.0.feed_forward.w2.weight"][:, 48:])
    wo = model.get_parameter("layers.0.attention.wo.weight")
    new_cols = torch.cat(
        [torch.arange(8 * 2, 8 * 4), torch.arange(8 * 6, 8 * 8)]
    )  # heads 2,3 and 6,7 are new
    assert not torch.equal(wo[:, new_cols], snapshot["layers.0.attention.wo.weight"][:, new_cols])


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"layers": 1}, "layers=1 is smaller than the current 2"),
        ({"hidden": 16}, "hidden=16 is smaller than the current 32"),
        ({"heads": 6, "kv_heads": 4}, "heads=6 is not divisible by kv_heads=4"),
        ({"heads": 4, "kv_heads": 4}, "gives 1 query heads per kv head, fewer than the current 2"),
        ({"layers": 9}, "layers=9 exceeds the cap max_layers=8"),
        ({"hidden": 512}, "above the cap max_params=200,000"),
    ],
)
def test_bad_requests_give_one_line_errors(request_kwargs: dict, message: str) -> None:
    model = trained_like(small_config())
    caps = GrowthCaps(max_layers=8, max_params=200_000)
    with pytest.raises(SapwoodError, match=message) as info:
        grow_model(model, GrowthRequest(**request_kwargs), caps=caps)
    assert "\n" not in str(info.value)
    assert model.cfg.layers == 2 and model.cfg.hidden == 32  # a refused request leaves the model untouched


def test_memory_budget_cap_uses_sizing() -> None:
    from sapwood.sizing import training_memory_bytes

    model = trained_like(small_config())
    grown = target_config(model.cfg, GrowthRequest(hidden=512))
    needed = training_memory_bytes(grown) / 1e9
    with pytest.raises(
        SapwoodError, match=rf"needs {needed:.3g} GB of training memory, above memory_budget_gb=0.001"
    ):
        grow_model(model, GrowthRequest(hidden=512), caps=GrowthCaps(memory_budget_gb=0.001))
    grow_model(model, GrowthRequest(hidden=48), caps=GrowthCaps(memory_budget_gb=0.001))  # fits: allowed
    assert model.cfg.hidden == 48


def test_heads_not_multiple_of_group_is_refused() -> None:
    model = trained_like(small_config())
    with pytest.raises(SapwoodError, match="heads=5 is not a multiple of the 2 query heads per kv head"):
        grow_heads(model, 5)
