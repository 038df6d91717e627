"""Inference: KV cache, sampling, scheduler, model runner and the continuous-batching engine."""

from sapwood.infer.context import ContextLengthError, ContextPolicy
from sapwood.infer.engine import Engine
from sapwood.infer.kv_cache import KVBudgetError
from sapwood.infer.sampling import SamplingParams
from sapwood.infer.scheduler import QueueFullError, SchedulerConfig

__all__ = [
    "ContextLengthError", "ContextPolicy", "Engine", "KVBudgetError", "QueueFullError", "SamplingParams",
    "SchedulerConfig",
]
