"""OpenAI wire-format request and response models for completions and chat completions.

These are the route bodies FastAPI validates, so ``/openapi.json`` documents them. Requests are strict
(a string where a number belongs is a 422, never coerced) and every field is bounded; unknown fields are
ignored as the OpenAI API does. ``model`` may be left out (the served model). sapwood extensions:
``top_k``, ``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sapwood.infer.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOP_STRINGS, SEED_RANGE

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
REQUEST_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = REQUEST_CONFIG

    model: str | None = Field(
        None, max_length=256, description="the served model (see /v1/models); default it"
    )
    max_tokens: int | None = Field(None, ge=0, le=2**31 - 1, description="new tokens; 0 only with echo")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="below 1e-5 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="0 = off; at most the vocabulary size")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = Field(
        None, description=f"at most {MAX_STOP_STRINGS} strings of 1..{MAX_STOP_CHARS} characters")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="always generate max_tokens (benchmarks)")
    logit_bias: (
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[float, Field(ge=-100, le=100)]] | None
    ) = Field(None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias in [-100, 100]")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(value)}")
        return value

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def bias_by_token(self) -> dict[int, float]:
        return {int(token): value for token, value in (self.logit_bias or {}).items()}


class CompletionRequest(SamplingFields):
    prompt: str | list[TokenId] | list[str] = Field(description="text, token ids, or a list of one text")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="log-probabilities of each token and of its N most likely alternatives",
    )
    echo: bool = Field(
        False, description="return the prompt too (with its log-probabilities when logprobs is set)"
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError("only one prompt per request is served; send a string or a list of one string")
        return value

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only allowed with echo=true (to score the prompt)")
        return self


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = Field(False, description="log-probability of each generated token")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="alternatives per token (logprobs)"
    )

    @model_validator(mode="after")
    def _positive_tokens(self) -> ChatCompletionRequest:
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be >= 1 for chat completions")
        return self


# --- responses -----------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class OpenAIResponse(BaseModel):
    """What every completion response carries (stream chunks too, see ``text_api.StreamFormat.event``);
    subclasses fix ``object`` and ``choices``."""

    id: str
    object: str
    created: int
    model: str
    choices: list
    usage: Usage | None = None


class CompletionResponse(OpenAIResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatCompletionResponse(OpenAIResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sapwood"
    max_context: int | None = None
    parent: str | None = Field(None, description="for a LoRA adapter: the base model it runs on")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
