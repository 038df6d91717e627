"""The OpenAI-compatible text routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Handlers never touch tensors: they tokenize, submit to the :class:`EngineLoop`, and turn its step
outputs into JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from sapwood.errors import SapwoodError
from sapwood.infer.background import EngineLoop
from sapwood.infer.context import ContextLengthError
from sapwood.infer.request import Request, StepOutput
from sapwood.infer.sampling import SamplingParams
from sapwood.infer.scheduler import QueueFullError
from sapwood.serve import schemas
from sapwood.serve.errors import APIError, validation_message
from sapwood.serve.metrics import ServerMetrics
from sapwood.serve.settings import ServeSettings

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass
class Generation:
    """The text and counts of one finished request."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    @property
    def usage(self) -> schemas.Usage:
        return schemas.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                             total_tokens=self.prompt_tokens + self.completion_tokens)


class TextService:
    def __init__(self, loop: EngineLoop, settings: ServeSettings, metrics: ServerMetrics, model_name: str):
        self.loop, self.settings, self.metrics, self.model_name = loop, settings, metrics, model_name
        self.engine = loop.engine
        if self.engine.tokenizer is None:
            raise SapwoodError("serving text needs the checkpoint's tokenizer.json")
        self.tokenizer = self.engine.tokenizer
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def prompt_ids(self, prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def sampling(self, body: schemas.SamplingFields, prompt_tokens: int, max_tokens: int | None,
                 default_max: int) -> SamplingParams:
        if max_tokens is None:
            max_tokens = self.engine.policy.default_max_tokens(prompt_tokens, default_max)
        fields = dict(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                      repetition_penalty=body.repetition_penalty)
        fields.update({k: v for k, v in self.engine.sampling_defaults.items() if k not in body.model_fields_set})
        try:
            return SamplingParams(max_tokens=max_tokens, **fields, seed=body.seed, stop=body.stop_list,
                                  ignore_eos=body.ignore_eos)
        except SapwoodError as exc:
            raise APIError(400, str(exc)) from None

    async def outputs(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Submit and yield the request's step outputs until it finishes (cancelled if abandoned)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        try:
            request = self.loop.submit(prompt_ids, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        except ContextLengthError as exc:
            self.metrics.rejected.labels("context_length").inc()
            raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        except QueueFullError as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, str(exc), code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except SapwoodError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        deadline = loop.time() + self.settings.request_timeout_s
        finished = False
        try:
            while not finished:
                try:
                    output = await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise APIError(504, f"request timed out after {self.settings.request_timeout_s:g} s",
                                   code="timeout") from None
                finished = output.finished
                self._observe(request, output)
                yield output
        finally:
            if not finished:
                self.loop.cancel(request)

    def _observe(self, request: Request, output: StepOutput) -> None:
        self.metrics.generated_tokens.inc(len(output.new_token_ids))
        if len(request.output_ids) == 1 and output.new_token_ids and request.first_token_time is not None:
            self.metrics.ttft.observe(request.first_token_time - request.arrival_time)
        if output.finished and request.finish_reason == "error":
            raise APIError(500, "the inference engine failed; see the server log")
        if output.finished and request.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled because the server is shutting down")

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        text, request = [], None
        async for output in self.outputs(prompt_ids, params):
            text.append(output.text_delta)
            request = output.request
        return Generation("".join(text), len(prompt_ids), len(request.output_ids), request.finish_reason or "length")


async def parse_body(request: HTTPRequest, model: type[ModelT]) -> ModelT:
    """The JSON body as ``model``: 400 when it is not JSON (whatever the content type), 422 when a field
    is wrong."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise APIError(422, *validation_message(exc)) from None


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def build_text_router(service: TextService) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> schemas.ModelList:
        card = schemas.ModelCard(id=service.model_name, created=service.created,
                                 max_context=service.engine.cfg.max_context)
        return schemas.ModelList(data=[card])

    @router.post("/v1/completions", response_model=None)
    async def completions(request: HTTPRequest) -> schemas.CompletionResponse | StreamingResponse:
        body = await parse_body(request, schemas.CompletionRequest)
        service.check_model(body.model)
        prompt_ids = service.prompt_ids(body.prompt)
        params = service.sampling(body, len(prompt_ids), body.max_tokens, service.settings.default_max_tokens)
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            result = await service.generate(prompt_ids, params)
            choice = schemas.CompletionChoice(text=result.text, finish_reason=result.finish_reason)
            return schemas.CompletionResponse(id=completion_id, created=created, model=service.model_name,
                                              choices=[choice], usage=result.usage)
        outputs = service.outputs(prompt_ids, params)
        first = await anext(outputs)  # errors before the first token are still plain HTTP errors

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": service.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        async def events() -> AsyncIterator[bytes]:
            output = first
            async for output in _chain(first, outputs):
                finish = output.request.finish_reason if output.finished else None
                if output.text_delta or finish:
                    yield sse(chunk(output.text_delta, finish))
            if body.stream_options is not None and body.stream_options.include_usage:
                usage = _usage(len(prompt_ids), len(output.request.output_ids))
                yield sse({**chunk("", None), "choices": [], "usage": usage})
            yield sse("[DONE]")

        return StreamingResponse(_guard(events()), media_type="text/event-stream")

    @router.post("/v1/chat/completions", response_model=None)
    async def chat(request: HTTPRequest) -> schemas.ChatCompletionResponse | StreamingResponse:
        body = await parse_body(request, schemas.ChatCompletionRequest)
        service.check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        prompt_ids = service.tokenizer.encode(service.tokenizer.apply_chat_template(messages))
        params = service.sampling(body, len(prompt_ids), body.max_completion_tokens or body.max_tokens,
                                  service.settings.default_chat_max_tokens)
        chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            result = await service.generate(prompt_ids, params)
            choice = schemas.ChatChoice(message=schemas.ChatMessageOut(content=result.text),
                                        finish_reason=result.finish_reason)
            return schemas.ChatCompletionResponse(id=chat_id, created=created, model=service.model_name,
                                                  choices=[choice], usage=result.usage)
        outputs = service.outputs(prompt_ids, params)
        first = await anext(outputs)

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": service.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        async def events() -> AsyncIterator[bytes]:
            yield sse(chunk({"role": "assistant", "content": ""}, None))
            output = first
            async for output in _chain(first, outputs):
                finish = output.request.finish_reason if output.finished else None
                if output.text_delta or finish:
                    yield sse(chunk({"content": output.text_delta} if output.text_delta else {}, finish))
            if body.stream_options is not None and body.stream_options.include_usage:
                usage = _usage(len(prompt_ids), len(output.request.output_ids))
                yield sse({**chunk({}, None), "choices": [], "usage": usage})
            yield sse("[DONE]")

        return StreamingResponse(_guard(events()), media_type="text/event-stream")

    return router


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _chain(first: StepOutput, rest: AsyncIterator[StepOutput]) -> AsyncIterator[StepOutput]:
    yield first
    if not first.finished:
        async for output in rest:
            yield output


async def _guard(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Once streaming has begun, an error becomes a final SSE error event (the status is already sent)."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield sse({"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}})
