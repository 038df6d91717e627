"""Growth operators on the decoder: depth, FFN width, attention heads, hidden width.

Each operator changes a :class:`~sapwood.model.transformer.Decoder` in place and returns the list of
:class:`ParamChange` it made, so optimizer state can follow (``sapwood.grow.optimizer``). With
``function_preserving=True`` (the default) the grown model computes exactly the same logits:

- depth: new blocks whose attention ``wo`` and MLP ``w2`` are zero are identities on the residual
  stream; their input weights are random (``init="identity"``) or copied from the block they follow
  (``init="stack"``, function-preserving stacking);
- FFN width: new ``w1``/``w3`` rows random, new ``w2`` columns zero;
- heads: new query / kv heads with random ``wq``/``wk``/``wv`` rows and zero ``wo`` columns; each
  existing query head keeps its kv head (query heads are re-laid out when the group size grows);
- hidden width: new residual dimensions are zero everywhere they are written (embedding columns,
  ``wo``/``w2`` rows); RMSNorm gains and eps are rescaled so that the norm over more dimensions gives
  the old dimensions the same values; tied embeddings stay tied.

``function_preserving=False`` fills the new parts with the ordinary random initialization instead (the
"random init of new parts" baseline of ``sapwood bench grow``); ``init="gstack"`` copies blocks with
their output projections (G_stack, not function-preserving).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sapwood.config import ModelConfig
from sapwood.errors import SapwoodError
from sapwood.model.transformer import Block, Decoder, RMSNorm, residual_std, tie_head

DepthPosition = Literal["end", "middle", "evenly", "stack"]
DepthInit = Literal["identity", "stack", "gstack", "random"]


@dataclass
class ParamChange:
    """One parameter replaced or added by a growth operator.

    ``old`` is None for a brand-new parameter (a new block); then ``sibling`` is an existing parameter
    of the same role (same name in another block), used to pick its optimizer parameter group.
    ``placement`` gives, per dimension, the indices in ``new`` where the old entries went.
    """

    name: str
    new: nn.Parameter
    old: nn.Parameter | None = None
    placement: tuple[torch.Tensor, ...] | None = None
    sibling: nn.Parameter | None = None


def _cfg_with(cfg: ModelConfig, **changes) -> ModelConfig:
    data = cfg.model_dump()
    data.update(changes)
    return ModelConfig.model_validate(data)


def _corner(old_shape: Sequence[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.arange(n, device=device) for n in old_shape)


def embed_into(
    old: torch.Tensor, new_shape: Sequence[int], placement: tuple[torch.Tensor, ...],
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """A tensor of ``new_shape``: ``fill`` (zeros when None) with ``old`` written at ``placement``."""
    out = torch.zeros(new_shape, dtype=old.dtype, device=old.device) if fill is None else fill.clone()
    index = tuple(
        ix.view(*([1] * d), -1, *([1] * (len(placement) - d - 1))) for d, ix in enumerate(placement)
    )
    out[index] = old.detach()
    return out


def _random(
    shape: Sequence[int], like: torch.Tensor, std: float, generator: torch.Generator | None
) -> torch.Tensor:
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    return nn.init.normal_(out, 0.0, std, generator=generator) if std > 0 else out.zero_()


def _replace(
    module: nn.Module, attr: str, name: str, data: torch.Tensor, placement: tuple[torch.Tensor, ...]
) -> ParamChange:
    old = getattr(module, attr)
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    setattr(module, attr, new)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = data.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = data.shape
    return ParamChange(name=name, new=new, old=old, placement=placement)


def _grow_linear(
    linear: nn.Linear, name: str, out_features: int, in_features: int, row_index: torch.Tensor | None,
    new_std: float, generator: torch.Generator | None,
) -> ParamChange:
    """Grow a linear's weight; old rows go to ``row_index`` (default: the first rows), old columns first."""
    weight = linear.weight
    rows = row_index if row_index is not None else torch.arange(weight.shape[0], device=weight.device)
    placement = (rows, torch.arange(weight.shape[1], device=weight.device))
    fill = _random((out_features, in_features), weight, new_std, generator)
    return _replace(linear, "weight", name, embed_into(weight, fill.shape, placement, fill), placement)


def _check_not_shrinking(what: str, old: int, new: int) -> None:
    if new < old:
        raise SapwoodError(
            f"{what}={new} is smaller than the current {old}; growth can only add (use >= {old})"
        )


# --------------------------------------------------------------------------- depth


def depth_insert_after(old_layers: int, added: int, position: DepthPosition | Sequence[int]) -> list[int]:
    """For each new block, the index of the old block it is inserted after (-1 = before block 0)."""
    if isinstance(position, str):
        if position == "end":
            return [old_layers - 1] * added
        if position == "middle":
            return [old_layers // 2 - 1] * added
        if position == "evenly":
            return [((k + 1) * old_layers) // added - 1 for k in range(added)]
        raise SapwoodError(
            f"depth position={position!r} is not one of end, middle, evenly, or a list of indices"
        )
    after = list(position)
    if len(after) != added or any(not -1 <= i < old_layers for i in after):
        raise SapwoodError(
            f"depth positions {after} must be {added} indices in -1..{old_layers - 1} (insert after that "
            f"block)"
        )
    return sorted(after)


def grow_depth(
    model: Decoder, layers: int, position: DepthPosition | Sequence[int] = "evenly",
    init: DepthInit = "identity", function_preserving: bool = True, generator: torch.Generator | None = None,
) -> list[ParamChange]:
    """Grow to ``layers`` blocks by inserting new ones after the positions given."""
    cfg = model.cfg
    _check_not_shrinking("layers", cfg.layers, layers)
    added = layers - cfg.layers
    if added == 0:
        return []
    if init not in ("identity", "stack", "gstack", "random"):
        raise SapwoodError(f"depth init={init!r} is not one of identity, stack, gstack, random")
    if position == "stack":
        return stack_depth(model, layers)
    after = depth_insert_after(cfg.layers, added, position)
    new_cfg = _cfg_with(cfg, layers=layers)
    old_blocks = [model.layers[str(i)] for i in range(cfg.layers)]
    reference = next(iter(model.parameters()))
    ordered: list[tuple[Block, Block | None]] = []  # (block, source of a new block's sibling params)
    for i in range(-1, cfg.layers):
        if i >= 0:
            ordered.append((old_blocks[i], None))
        for _ in range(after.count(i)):
            source = old_blocks[max(i, 0)]
            ordered.append(
                (_new_block(new_cfg, source, init, function_preserving, reference, generator), source)
            )
    return _install_blocks(model, new_cfg, ordered)


def _install_blocks(
    model: Decoder, new_cfg: ModelConfig, ordered: list[tuple[Block, Block | None]]
) -> list[ParamChange]:
    """Make ``ordered`` the model's stack (``(block, source)``; source None for a kept block) and list each
    new block's parameters with its source's as sibling, for the optimizer surgery."""
    model.layers = nn.ModuleDict({str(i): block for i, (block, _) in enumerate(ordered)})
    model.cfg = new_cfg
    changes = []
    for index, (block, source) in enumerate(ordered):
        if source is None:
            continue
        source_params = dict(source.named_parameters())
        for pname, param in block.named_parameters():
            changes.append(
                ParamChange(name=f"layers.{index}.{pname}", new=param, sibling=source_params[pname])
            )
    return changes


def _new_block(
    cfg: ModelConfig, source: Block, init: DepthInit, function_preserving: bool, reference: torch.Tensor,
    generator: torch.Generator | None,
) -> Block:
    with torch.device("meta"):  # built without touching the global RNG: runs stay reproducible
        block = Block(cfg)
    block = block.to_empty(device=reference.device).to(reference.dtype)
    block.attention_norm.eps = block.ffn_norm.eps = source.attention_norm.eps
    with torch.no_grad():
        if init in ("stack", "gstack"):
            block.load_state_dict(source.state_dict())
        else:
            block.init_weights(cfg, generator)
        if function_preserving and init in ("identity", "stack"):
            for linear in (block.attention.wo, block.feed_forward.w2):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
    return block


def stack_depth(model: Decoder, layers: int) -> list[ParamChange]:
    """G_stack (Du et al., NeurIPS 2024): the grown stack is the whole small stack repeated ``layers / L``
    times (block ``k * L + i`` is a copy of block ``i``, outputs included; not function-preserving).
    The paper's recommended growth factor is 4 (``layers = 4 * L``)."""
    cfg = model.cfg
    if layers % cfg.layers:
        raise SapwoodError(
            f"layers={layers} is not a multiple of the current {cfg.layers}; G_stack repeats the "
            f"whole stack (use a multiple of {cfg.layers}, the paper uses 4x)"
        )
    factor = layers // cfg.layers
    new_cfg = _cfg_with(cfg, layers=layers)
    old_blocks = [model.layers[str(i)] for i in range(cfg.layers)]
    reference = next(iter(model.parameters()))
    ordered: list[tuple[Block, Block | None]] = [(block, None) for block in old_blocks]
    for _ in range(1, factor):
        for source in old_blocks:
            ordered.append((_new_block(new_cfg, source, "gstack", False, reference, None), source))
    return _install_blocks(model, new_cfg, ordered)


# --------------------------------------------------------------------------- FFN width


def split_ffn(
    model: Decoder, ffn: int, noise: float = 1e-3, generator: torch.Generator | None = None
) -> list[ParamChange]:
    """Grow every block's SwiGLU to ``ffn`` units by splitting existing ones (Net2Net-style, symmetry broken
    by noise): new unit ``j'`` copies the ``w1``/``w3`` rows of unit ``j``, and the pair shares ``j``'s
    ``w2`` column as ``w/2 + e`` and ``w/2 - e`` with ``e ~ N(0, noise * std(w))``. Both units compute the
    same activation, so the output is unchanged (up to rounding) while their gradients differ."""
    cfg = model.cfg
    _check_not_shrinking("ffn", cfg.ffn, ffn)
    added = ffn - cfg.ffn
    if added == 0:
        return []
    changes = []
    for index, block in model.layers.items():
        mlp = block.feed_forward
        device = mlp.w1.weight.device
        cpu_generator = generator if generator is not None and generator.device.type == "cpu" else None
        source = torch.randperm(cfg.ffn, generator=cpu_generator)[: added % cfg.ffn or cfg.ffn]
        source = torch.cat([torch.arange(cfg.ffn)] * (added // cfg.ffn) + [source])[:added].to(device)
        prefix = f"layers.{index}.feed_forward"
        rows = torch.arange(cfg.ffn, device=device)
        for name in ("w1", "w3"):
            linear = getattr(mlp, name)
            data = torch.cat([linear.weight.detach(), linear.weight.detach()[source]], dim=0)
            changes.append(
                _replace(
                    linear, "weight", f"{prefix}.{name}.weight", data,
                    (rows, torch.arange(cfg.hidden, device=device)),
                )
            )
        w2 = mlp.w2.weight.detach()
        # a unit split k times shares its column among k + 1 copies
        share = torch.ones(cfg.ffn, dtype=w2.dtype, device=device).index_add_(
            0, source, torch.ones(added, dtype=w2.dtype, device=device)
        )
        columns = torch.cat([w2 / share, w2[:, source] / share[source]], dim=1)
        eps = _random((cfg.hidden, added), w2, noise * float(w2.std()), generator)
        columns[:, cfg.ffn :] += eps
        columns[:, : cfg.ffn].index_add_(1, source, -eps)
        changes.append(
            _replace(
                mlp.w2, "weight", f"{prefix}.w2.weight", columns,
                (torch.arange(cfg.hidden, device=device), rows),
            )
        )
    model.cfg = _cfg_with(cfg, ffn=ffn)
    return changes


def grow_ffn(
    model: Decoder, ffn: int, function_preserving: bool = True, generator: torch.Generator | None = None
) -> list[ParamChange]:
    """Grow every block's SwiGLU to ``ffn`` units."""
    cfg = model.cfg
    _check_not_shrinking("ffn", cfg.ffn, ffn)
    if ffn == cfg.ffn:
        return []
    out_std = residual_std(cfg) if not function_preserving else 0.0
    changes = []
    for index, block in model.layers.items():
        mlp = block.feed_forward
        prefix = f"layers.{index}.feed_forward"
        changes.append(
            _grow_linear(mlp.w1, f"{prefix}.w1.weight", ffn, cfg.hidden, None, cfg.init_std, generator)
        )
        changes.append(
            _grow_linear(mlp.w3, f"{prefix}.w3.weight", ffn, cfg.hidden, None, cfg.init_std, generator)
        )
        changes.append(_grow_linear(mlp.w2, f"{prefix}.w2.weight", cfg.hidden, ffn, None, out_std, generator))
    model.cfg = _cfg_with(cfg, ffn=ffn)
    return changes


# --------------------------------------------------------------------------- attention heads


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def grow_heads(
    model: Decoder, heads: int, kv_heads: int | None = None, function_preserving: bool = True,
    generator: torch.Generator | None = None,
) -> list[ParamChange]:
    """Grow to ``heads`` query heads and ``kv_heads`` kv heads (default: keep the query heads per kv head).

    Query head ``h`` of kv group ``j = h // g`` moves to ``j * g' + h % g`` so it keeps its kv head;
    the group size ``g' = heads / kv_heads`` may grow but not shrink.
    """
    cfg = model.cfg
    old_groups = cfg.kv_groups
    if kv_heads is None:
        if heads % old_groups:
            raise SapwoodError(
                f"heads={heads} is not a multiple of the {old_groups} query heads per kv head; "
                f"pass kv_heads or choose a multiple of {old_groups}"
            )
        kv_heads = heads // old_groups
    _check_not_shrinking("heads", cfg.heads, heads)
    _check_not_shrinking("kv_heads", cfg.kv_heads, kv_heads)
    if heads % kv_heads:
        raise SapwoodError(
            f"heads={heads} is not divisible by kv_heads={kv_heads}; kv_heads must divide heads"
        )
    groups = heads // kv_heads
    if groups < old_groups:
        raise SapwoodError(
            f"heads={heads} with kv_heads={kv_heads} gives {groups} query heads per kv head, fewer than the "
            f"current {old_groups}; growth keeps each query head with its kv head (need heads >= "
            f"{old_groups} * kv_heads)"
        )
    if heads == cfg.heads and kv_heads == cfg.kv_heads:
        return []
    head_dim = cfg.head_dim
    device = model.layers["0"].attention.wq.weight.device
    old_heads = torch.arange(cfg.heads, device=device)
    moved_heads = (old_heads // old_groups) * groups + old_heads % old_groups
    q_rows = _head_rows(moved_heads, head_dim)
    out_std = residual_std(cfg) if not function_preserving else 0.0
    changes = []
    for index, block in model.layers.items():
        attn = block.attention
        prefix = f"layers.{index}.attention"
        changes.append(
            _grow_linear(
                attn.wq, f"{prefix}.wq.weight", heads * head_dim, cfg.hidden, q_rows, cfg.init_std, generator
            )
        )
        for name in ("wk", "wv"):
            changes.append(
                _grow_linear(
                    getattr(attn, name), f"{prefix}.{name}.weight", kv_heads * head_dim, cfg.hidden, None,
                    cfg.init_std, generator,
                )
            )
        wo = attn.wo.weight
        placement = (torch.arange(cfg.hidden, device=device), q_rows)
        fill = _random((cfg.hidden, heads * head_dim), wo, out_std, generator)
        changes.append(
            _replace(
                attn.wo, "weight", f"{prefix}.wo.weight", embed_into(wo, fill.shape, placement, fill),
                placement,
            )
        )
    model.cfg = _cfg_with(cfg, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    return changes


# --------------------------------------------------------------------------- hidden width


def _grow_norm(norm: RMSNorm, name: str, hidden: int, gain_scale: float, eps_scale: float) -> ParamChange:
    weight = norm.weight
    placement = _corner(weight.shape, weight.device)
    fill = torch.full((hidden,), gain_scale, dtype=weight.dtype, device=weight.device)
    data = embed_into(weight * gain_scale, (hidden,), placement, fill)
    norm.eps = norm.eps * eps_scale
    return _replace(norm, "weight", name, data, placement)


def grow_hidden(
    model: Decoder, hidden: int, function_preserving: bool = True, generator: torch.Generator | None = None
) -> list[ParamChange]:
    """Grow the residual stream to ``hidden`` dimensions (head_dim is kept; it becomes explicit)."""
    cfg = model.cfg
    _check_not_shrinking("hidden", cfg.hidden, hidden)
    if hidden == cfg.hidden:
        return []
    # RMS over hidden dims of a vector whose new dims are 0 is sqrt(old/new) times the old RMS (eps too):
    # dividing eps and multiplying the gains by these factors leaves the old dims' output unchanged.
    gain_scale = math.sqrt(cfg.hidden / hidden) if function_preserving else 1.0
    eps_scale = cfg.hidden / hidden if function_preserving else 1.0
    write_std = 0.0 if function_preserving else None
    changes = []
    if model.tok_embeddings is not None:
        emb = model.tok_embeddings.weight
        fill = _random((emb.shape[0], hidden), emb, cfg.init_std if write_std is None else 0.0, generator)
        placement = _corner(emb.shape, emb.device)
        changes.append(
            _replace(
                model.tok_embeddings, "weight", "tok_embeddings.weight",
                embed_into(emb, fill.shape, placement, fill), placement,
            )
        )
    write_residual_std = residual_std(cfg) if write_std is None else 0.0
    for index, block in model.layers.items():
        prefix = f"layers.{index}"
        attn, mlp = block.attention, block.feed_forward
        changes.append(
            _grow_norm(block.attention_norm, f"{prefix}.attention_norm.weight", hidden, gain_scale, eps_scale)
        )
        changes.append(_grow_norm(block.ffn_norm, f"{prefix}.ffn_norm.weight", hidden, gain_scale, eps_scale))
        for name, linear in (
            ("attention.wq", attn.wq), ("attention.wk", attn.wk), ("attention.wv", attn.wv),
            ("feed_forward.w1", mlp.w1), ("feed_forward.w3", mlp.w3),
        ):
            changes.append(
                _grow_linear(
                    linear, f"{prefix}.{name}.weight", linear.out_features, hidden, None, cfg.init_std,
                    generator,
                )
            )
        for name, linear in (("attention.wo", attn.wo), ("feed_forward.w2", mlp.w2)):
            changes.append(
                _grow_linear(
                    linear, f"{prefix}.{name}.weight", hidden, linear.in_features, None, write_residual_std,
                    generator,
                )
            )
    if model.norm is not None:
        changes.append(_grow_norm(model.norm, "norm.weight", hidden, gain_scale, eps_scale))
    if model.output is not None:
        if cfg.tied_embeddings and model.tok_embeddings is not None:
            tie_head(model)
            model.output.in_features = hidden
        else:
            changes.append(
                _grow_linear(
                    model.output, "output.weight", model.output.out_features, hidden, None, cfg.init_std,
                    generator,
                )
            )
    model.cfg = _cfg_with(
        cfg, hidden=hidden, head_dim=cfg.head_dim,
        norm_eps=cfg.norm_eps * (cfg.hidden / hidden) if function_preserving else cfg.norm_eps,
    )
    return changes
