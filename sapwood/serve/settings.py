"""Server settings: CLI flags fill these; API keys come only from the environment."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from sapwood.config import Section

API_KEYS_ENV = "SAPWOOD_API_KEYS"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServeSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str | None = Field(None, description="name in /v1/models; default: see default_model_name")
    max_batch: int = Field(64, ge=1, description="requests decoded together (KV-cache slots)")
    max_queue: int = Field(256, ge=1, description="waiting requests before 429")
    kv_memory_gb: float | None = Field(
        None,
        gt=0,
        description="KV-cache budget in GB (1e9 bytes); default: half "
        "the memory free after loading the model",
    )
    request_timeout_s: float = Field(300.0, gt=0)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    default_max_tokens: int = Field(16, ge=1, description="completions without max_tokens")
    default_chat_max_tokens: int = Field(256, ge=1, description="chat completions without max_tokens")
    retry_after_s: int = Field(1, ge=1)
    graceful_shutdown_s: float = Field(60.0, gt=0)
    predict_workers: int = Field(2, ge=1, description="threads running /v1/predict work")
    predict_queue: int = Field(8, ge=1, description="/v1/predict requests waiting or running before 429")
    predict_timeout_s: float = Field(60.0, gt=0, description="seconds before a /v1/predict request gets 504")
    context_overflow: Literal["refuse", "window"] = Field(
        "refuse", description="a request past the model's maximum context (or the whole KV budget): refused "
        "(400/413), or served through attention sinks + a sliding window with bounded memory")
    sinks: int = Field(4, ge=0, description="attention-sink tokens kept with --context-overflow window")
    window: int | None = Field(None, ge=1, description="recent tokens kept with --context-overflow window "
                               "(default: max_context - sinks)")
    window_requests: int = Field(4, ge=1, description="windowed requests at once before 429")
    lora_adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapter name -> PEFT adapter "
        "folder, served on the base model (requests pick one by model name)",
    )


def api_keys_from_env() -> frozenset[str]:
    """Comma-separated keys in ``SAPWOOD_API_KEYS`` (empty entries ignored)."""
    raw = os.environ.get(API_KEYS_ENV, "")
    return frozenset(key.strip() for key in raw.split(",") if key.strip())
