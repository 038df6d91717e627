"""Function-preserving growth of a decoder during training: operators, optimizer surgery, triggers."""

from sapwood.grow.operators import ParamChange, grow_depth, grow_ffn, grow_heads, grow_hidden
from sapwood.grow.optimizer import apply_changes_to_optimizer
from sapwood.grow.plan import GrowthRequest, grow_model, request_towards, target_config

__all__ = [
    "GrowthRequest", "ParamChange", "apply_changes_to_optimizer", "grow_depth", "grow_ffn", "grow_heads",
    "grow_hidden", "grow_model", "request_towards", "target_config",
]
