"""The OpenAI-compatible text routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Handlers never touch tensors: they tokenize, submit to the :class:`EngineLoop`, and turn its step
outputs into JSON or server-sent events (one streaming path for both routes, :class:`StreamFormat`).
A client that goes away, streaming or not, cancels its request; the engine frees its slot next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from sapwood.errors import SapwoodError
from sapwood.infer.background import EngineLoop, EngineUnavailableError
from sapwood.infer.context import ContextLengthError
from sapwood.infer.kv_cache import KVBudgetError
from sapwood.infer.request import Request, StepOutput
from sapwood.infer.sampling import SamplingParams
from sapwood.infer.scheduler import QueueFullError
from sapwood.serve import schemas
from sapwood.serve.errors import APIError
from sapwood.serve.metrics import ServerMetrics
from sapwood.serve.settings import ServeSettings

T = TypeVar("T")
TokenLogprobs = tuple[float, list[tuple[int, float]]]
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only metrics ever see it


@dataclass
class Generation:
    """The tokens, text and log-probabilities of one finished request."""

    text: str
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def usage(self) -> schemas.Usage:
        return usage(len(self.prompt_ids), len(self.output_ids))


def usage(prompt_tokens: int, completion_tokens: int) -> schemas.Usage:
    return schemas.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


class TextService:
    def __init__(self, loop: EngineLoop, settings: ServeSettings, metrics: ServerMetrics, model_name: str):
        self.loop, self.settings, self.metrics, self.model_name = loop, settings, metrics, model_name
        self.engine = loop.engine
        if self.engine.tokenizer is None:
            raise SapwoodError("serving text needs the checkpoint's tokenizer.json")
        self.tokenizer = self.engine.tokenizer
        self.created = int(time.time())
        self.token_text = lru_cache(maxsize=1 << 16)(lambda token: self.tokenizer.decode([token]))

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); 404 for any other name."""
        if name is None or name == self.model_name:
            return None
        if name in self.engine.adapters:
            return name
        shown = name if len(name) <= 64 else name[:64] + "…"
        served = ", ".join(repr(n) for n in [self.model_name, *self.engine.adapters])
        raise APIError(404, f"model {shown!r} does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    def prompt_ids(self, prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def sampling(
        self, body: schemas.SamplingFields, prompt_tokens: int, max_tokens: int | None, default_max: int,
        logprobs: int | None = None, prompt_logprobs: bool = False,
    ) -> SamplingParams:
        if max_tokens is None:
            max_tokens = self.engine.policy.default_max_tokens(prompt_tokens, default_max)
        fields = dict(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                      repetition_penalty=body.repetition_penalty)
        fields.update(
            {k: v for k, v in self.engine.sampling_defaults.items() if k not in body.model_fields_set}
        )
        try:
            return SamplingParams(
                max_tokens=max_tokens, **fields, seed=body.seed, stop=body.stop_list,
                ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                logit_bias=body.bias_by_token,
            )
        except SapwoodError as exc:
            raise APIError(400, str(exc)) from None

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_output: Callable[[StepOutput], None], adapter: str | None = None) -> Request:
        try:
            return self.loop.submit(prompt_ids, params, on_output, adapter)
        except ContextLengthError as exc:
            self.metrics.rejected.labels("context_length").inc()
            raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        except KVBudgetError as exc:
            self.metrics.rejected.labels("kv_budget").inc()
            raise APIError(413, str(exc), param="max_tokens", code="kv_budget_exceeded") from None
        except QueueFullError as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, str(exc), code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except EngineUnavailableError as exc:
            self.metrics.rejected.labels("engine_down").inc()
            raise APIError(503, str(exc), code="engine_unavailable") from None
        except SapwoodError as exc:
            raise APIError(400, str(exc)) from None

    async def outputs(self, prompt_ids: list[int], params: SamplingParams,
                      adapter: str | None = None) -> AsyncIterator[StepOutput]:
        """Submit and yield the request's step outputs until it finishes (cancelled if abandoned). Outputs
        that arrived together are merged into one (a client that reads slower than the engine steps gets
        fewer, larger events)."""
        box = OutputBox(self.settings.request_timeout_s)
        request = self.submit(prompt_ids, params, box.put, adapter)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        finished = first_seen = False
        try:
            while not finished:
                try:
                    ready = await box.take()
                except TimeoutError:
                    raise APIError(504, f"request timed out after {self.settings.request_timeout_s:g} s",
                                   code="timeout") from None
                output = merge_outputs(ready)
                finished = output.finished
                if not first_seen and request.first_token_time is not None:
                    first_seen = True
                    self.metrics.ttft.observe(request.first_token_time - request.arrival_time)
                self._observe(request, output)
                yield output
        finally:
            box.close()
            if not finished:
                self.loop.cancel(request)

    def _observe(self, request: Request, output: StepOutput) -> None:
        self.metrics.generated_tokens.inc(len(output.new_token_ids))
        if output.finished and request.finish_reason == "error":
            raise APIError(500, f"{request.error or 'the inference engine failed'}; see the server log",
                           code="engine_error")
        if output.finished and request.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled because the server is shutting down")

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> Generation:
        text, request = [], None
        async for output in self.outputs(prompt_ids, params, adapter):
            text.append(output.text_delta)
            request = output.request
        return Generation("".join(text), prompt_ids, request.output_ids, request.finish_reason or "length",
                          request.output_logprobs, request.prompt_logprobs)

    # --- log-probabilities in the OpenAI shapes ------------------------------------------------------------
    def completion_logprobs(self, token_ids: list[int], scored: list[TokenLogprobs | None],
                            start_offset: int = 0) -> schemas.CompletionLogprobs:
        """The legacy completions shape; ``scored`` is None for a token without a score (the first of an
        echoed prompt). ``text_offset`` counts characters from the start of the returned text."""
        tokens = [self.token_text(t) for t in token_ids]
        offsets, cursor = [], start_offset
        for token in tokens:
            offsets.append(cursor)
            cursor += len(token)
        return schemas.CompletionLogprobs(
            tokens=tokens, token_logprobs=[s[0] if s is not None else None for s in scored],
            top_logprobs=[self._top_by_text(s[1]) if s is not None else None for s in scored],
            text_offset=offsets,
        )

    def _top_by_text(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """Alternatives keyed by their text; tokens with the same text keep the larger value."""
        by_text: dict[str, float] = {}
        for token, logprob in top:
            by_text.setdefault(self.token_text(token), logprob)
        return by_text

    def chat_logprobs(self, token_ids: list[int], scored: list[TokenLogprobs]) -> schemas.ChatLogprobs:
        def entry(token: int, logprob: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return schemas.ChatLogprobs(
            content=[
                schemas.ChatTokenLogprob(
                    **entry(t, lp), top_logprobs=[schemas.TopLogprob(**entry(i, v)) for i, v in top]
                )
                for t, (lp, top) in zip(token_ids, scored, strict=True)
            ]
        )


class OutputBox:
    """The step outputs of one request on their way from the engine's deliveries (on the event loop) to its
    handler: a list and at most one waiting future, and one timer for the request's deadline (an
    ``asyncio.Queue`` read through ``wait_for`` costs a task and a timer per token)."""

    def __init__(self, timeout_s: float):
        self._loop = asyncio.get_running_loop()
        self._items: list[StepOutput] = []
        self._waiter: asyncio.Future | None = None
        self.expired = False
        self._timer = self._loop.call_later(timeout_s, self._expire)

    def put(self, output: StepOutput) -> None:
        self._items.append(output)
        self._wake()

    def _expire(self) -> None:
        self.expired = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list[StepOutput]:
        """Every output delivered since the last take, waiting for one; TimeoutError past the deadline."""
        while not self._items:
            if self.expired:
                raise TimeoutError
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items

    def close(self) -> None:
        self._timer.cancel()


def merge_outputs(outputs: list[StepOutput]) -> StepOutput:
    """Consecutive step outputs of one request as one."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    return StepOutput(
        last.request, [t for o in outputs for t in o.new_token_ids], "".join(o.text_delta for o in outputs),
        last.finished, [lp for o in outputs for lp in o.new_logprobs],
    )


async def until_disconnect(request: HTTPRequest, work: Awaitable[T]) -> T | Response:
    """``work``'s result, or a bare 499 when the client goes away first (``work`` is then cancelled, which
    cancels its engine request)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, APIError):
        await task
    return Response(status_code=CLIENT_CLOSED)


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class StreamFormat:
    """How one route's stream looks: its ``object`` name, opening events, and the event a step adds.

    Most events carry only text (no log-probabilities, not the last): :meth:`text_event` writes those as
    the bytes of one such event rendered through :meth:`event` once per stream, split around its text, with
    the new text's JSON string in between (the same bytes, one ``json.dumps`` of a string per event)."""

    object_name = ""
    TEXT_MARK = "\ufdd0sapwood-text\ufdd1"  # noncharacters: a placeholder no real text holds

    def __init__(self, service: TextService, prefix: str, include_usage: bool):
        self.service, self.include_usage = service, include_usage
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.model_name = service.model_name  # the adapter's name for a request to a LoRA adapter
        self._around_text: tuple[bytes, bytes] | None = None

    def event(self, choices: list[dict], usage_: schemas.Usage | None = None) -> bytes:
        """One chunk: the fields every OpenAI response carries, then ``choices`` (and ``usage``)."""
        payload = {"id": self.id, "object": self.object_name, "created": self.created,
                   "model": self.model_name, "choices": choices}
        if usage_ is not None:
            payload["usage"] = usage_.model_dump()
        return sse(payload)

    def text_choice(self, text: str) -> dict:
        """The choice of an event that carries only ``text``."""
        raise NotImplementedError

    def text_event(self, text: str) -> bytes:
        """``event([text_choice(text)])``, without rendering the rest of the event again."""
        if self._around_text is None:
            parts = self.event([self.text_choice(self.TEXT_MARK)]).split(json.dumps(self.TEXT_MARK).encode())
            if len(parts) != 2:  # the placeholder in the model's name: render every event in full
                return self.event([self.text_choice(text)])
            self._around_text = (parts[0], parts[1])
        head, tail = self._around_text
        return head + json.dumps(text).encode() + tail

    def opening(self, first: StepOutput) -> list[bytes]:
        return []

    def step(self, output: StepOutput) -> bytes | None:
        raise NotImplementedError


class CompletionStream(StreamFormat):
    object_name = "text_completion"

    def __init__(self, service: TextService, include_usage: bool, logprobs: bool, echo_ids: list[int] | None):
        super().__init__(service, "cmpl", include_usage)
        self.logprobs, self.echo_ids = logprobs, echo_ids
        self.offset = 0

    def opening(self, first: StepOutput) -> list[bytes]:
        """With ``echo``: the prompt (and its scores, known once it is prefilled) as the first event."""
        if self.echo_ids is None:
            return []
        text = self.service.tokenizer.decode(self.echo_ids)
        logprobs = None
        if self.logprobs:
            scored = [None] + list(first.request.prompt_logprobs or [])
            logprobs = self.service.completion_logprobs(self.echo_ids, scored)
        self.offset = len(text)
        return [self._event(text, logprobs, None)]

    def text_choice(self, text: str) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": None}

    def _event(self, text: str, logprobs: schemas.CompletionLogprobs | None, finish: str | None) -> bytes:
        return self.event([{"index": 0, "text": text, "logprobs": logprobs.model_dump() if logprobs else None,
                            "finish_reason": finish}])

    def step(self, output: StepOutput) -> bytes | None:
        finish = output.request.finish_reason if output.finished else None
        logprobs = None
        if self.logprobs and output.new_logprobs:
            logprobs = self.service.completion_logprobs(
                output.new_token_ids, output.new_logprobs, self.offset
            )
        self.offset += len(output.text_delta)
        if finish or logprobs:
            return self._event(output.text_delta, logprobs, finish)
        return self.text_event(output.text_delta) if output.text_delta else None


class ChatStream(StreamFormat):
    object_name = "chat.completion.chunk"

    def __init__(self, service: TextService, include_usage: bool, logprobs: bool):
        super().__init__(service, "chatcmpl", include_usage)
        self.logprobs = logprobs

    def text_choice(self, text: str) -> dict:
        return {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def _event(self, delta: dict, finish: str | None, logprobs: schemas.ChatLogprobs | None = None) -> bytes:
        return self.event(
            [
                {
                    "index": 0, "delta": delta, "logprobs": logprobs.model_dump() if logprobs else None,
                    "finish_reason": finish,
                }
            ]
        )

    def opening(self, first: StepOutput) -> list[bytes]:
        return [self._event({"role": "assistant", "content": ""}, None)]

    def step(self, output: StepOutput) -> bytes | None:
        finish = output.request.finish_reason if output.finished else None
        logprobs = None
        if self.logprobs and output.new_logprobs:
            logprobs = self.service.chat_logprobs(output.new_token_ids, output.new_logprobs)
        if finish or logprobs:
            return self._event({"content": output.text_delta} if output.text_delta else {}, finish, logprobs)
        return self.text_event(output.text_delta) if output.text_delta else None


async def stream_response(service: TextService, prompt_ids: list[int], params: SamplingParams,
                          fmt: StreamFormat, adapter: str | None = None) -> StreamingResponse:
    """Server-sent events of one request; errors before the first output are plain HTTP errors."""
    if adapter is not None:
        fmt.model_name = adapter
    outputs = service.outputs(prompt_ids, params, adapter)
    first = await anext(outputs)

    async def events() -> AsyncIterator[bytes]:
        try:
            for opening in fmt.opening(first):
                yield opening
            output = first
            if event := fmt.step(first):
                yield event
            if not first.finished:
                async for output in outputs:
                    if event := fmt.step(output):
                        yield event
            if fmt.include_usage:
                yield fmt.event([], usage(len(prompt_ids), len(output.request.output_ids)))
            yield sse("[DONE]")
        except APIError as exc:  # the status is already sent: a final SSE error event
            yield sse(
                {"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}}
            )
        finally:
            await outputs.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")


def build_text_router(service: TextService) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> schemas.ModelList:
        """The base model and each LoRA adapter served on it (``parent``: the base); a request's ``model``
        picks one."""
        max_context = service.engine.cfg.max_context
        cards = [schemas.ModelCard(id=service.model_name, created=service.created, max_context=max_context)]
        cards += [schemas.ModelCard(id=name, created=service.created, max_context=max_context,
                                    parent=service.model_name) for name in service.engine.adapters]
        return schemas.ModelList(data=cards)

    @router.post("/v1/completions", response_model=schemas.CompletionResponse,
                 responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(body: schemas.CompletionRequest, request: HTTPRequest):
        """Text completion (OpenAI legacy completions): ``logprobs`` and ``echo`` for evaluation harnesses."""
        adapter = service.check_model(body.model)
        prompt_ids = service.prompt_ids(body.prompt)
        score_prompt = body.echo and (body.logprobs is not None or body.max_tokens == 0)
        params = service.sampling(body, len(prompt_ids), body.max_tokens, service.settings.default_max_tokens,
                                  body.logprobs, score_prompt)
        if body.stream:
            fmt = CompletionStream(service, _include_usage(body), body.logprobs is not None,
                                   prompt_ids if body.echo else None)
            return await stream_response(service, prompt_ids, params, fmt, adapter)
        result = await until_disconnect(request, service.generate(prompt_ids, params, adapter))
        if isinstance(result, Response):
            return result
        text = (service.tokenizer.decode(prompt_ids) if body.echo else "") + result.text
        logprobs = None
        if body.logprobs is not None:
            ids = (prompt_ids if body.echo else []) + result.output_ids
            scored = ([None] + list(result.prompt_logprobs or []) if body.echo else []) + list(
                result.output_logprobs
            )
            logprobs = service.completion_logprobs(ids, scored)
        choice = schemas.CompletionChoice(text=text, logprobs=logprobs, finish_reason=result.finish_reason)
        return schemas.CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=adapter or service.model_name,
            choices=[choice], usage=result.usage,
        )

    @router.post("/v1/chat/completions", response_model=schemas.ChatCompletionResponse,
                 responses={200: {"content": {"text/event-stream": {}}}})
    async def chat(body: schemas.ChatCompletionRequest, request: HTTPRequest):
        """Chat completion over the checkpoint's chat template (``logprobs`` / ``top_logprobs`` supported)."""
        adapter = service.check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        prompt_ids = service.tokenizer.encode(service.tokenizer.apply_chat_template(messages))
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = service.sampling(body, len(prompt_ids), body.max_completion_tokens or body.max_tokens,
                                  service.settings.default_chat_max_tokens, top)
        if body.stream:
            return await stream_response(service, prompt_ids, params,
                                         ChatStream(service, _include_usage(body), body.logprobs), adapter)
        result = await until_disconnect(request, service.generate(prompt_ids, params, adapter))
        if isinstance(result, Response):
            return result
        logprobs = service.chat_logprobs(result.output_ids, result.output_logprobs) if body.logprobs else None
        choice = schemas.ChatChoice(message=schemas.ChatMessageOut(content=result.text), logprobs=logprobs,
                                    finish_reason=result.finish_reason)
        return schemas.ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                              model=adapter or service.model_name, choices=[choice],
                                              usage=result.usage)

    return router


def _include_usage(body: schemas.SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage

