"""The HTTP server, for real: uvicorn on a free loopback port, the `openai` client and httpx."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sapwood.infer import Engine, SamplingParams
from sapwood.serve.app import build_engine, create_app
from sapwood.serve.server import BackgroundServer, resolve_host
from sapwood.serve.settings import ServeSettings

KEY = "test-key-not-a-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(lm_folder):
    settings = ServeSettings(max_batch=16, max_body_bytes=64 * 1024)
    with BackgroundServer(create_app(lm_folder, settings, api_keys=frozenset({KEY})), settings) as running:
        yield running


@pytest.fixture(scope="module")
def reference(lm_folder):
    """Single-request greedy outputs computed offline with the engine."""
    engine = Engine.from_folder(lm_folder)

    def greedy_text(prompt: str, max_tokens: int) -> tuple[str, int, int]:
        request = engine.generate(
            [engine.tokenizer.encode(prompt)], SamplingParams(max_tokens, temperature=0)
        )[0]
        return request.stream.text, len(request.prompt_ids), len(request.output_ids)

    return engine, greedy_text


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_openai_completion_chat_and_usage(server, reference):
    engine, greedy_text = reference
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny-lm"]
    prompt = "def parse(text):\n    "
    completion = c.completions.create(model="tiny-lm", prompt=prompt, max_tokens=12, temperature=0)
    text, prompt_tokens, completion_tokens = greedy_text(prompt, 12)
    assert completion.choices[0].text == text and completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, 12)
    assert completion.usage.total_tokens == prompt_tokens + 12

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = c.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=7, temperature=0)
    rendered = engine.tokenizer.apply_chat_template(messages)
    assert rendered == "system: be brief\nuser: hello\nassistant:"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == greedy_text(rendered, 7)[0]
    assert chat.usage.prompt_tokens == len(engine.tokenizer.encode(rendered))
    assert chat.usage.completion_tokens == 7


def test_streaming_equals_non_streaming(server, reference):
    _, greedy_text = reference
    c = client(server)
    prompt = "import os\n"
    chunks = list(
        c.completions.create(
            model="tiny-lm", prompt=prompt, max_tokens=15, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == greedy_text(prompt, 15)[0]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15

    messages = [{"role": "user", "content": "count"}]
    stream = c.chat.completions.create(
        model="tiny-lm", messages=messages, max_tokens=9, temperature=0, stream=True
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    streamed = "".join(p.choices[0].delta.content or "" for p in parts)
    full = c.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=9, temperature=0)
    assert streamed == full.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


def test_response_wire_format_keys_in_openai_order(server):
    """The JSON of every response shape, key by key and in order (what clients parsing by hand see)."""
    head = ["id", "object", "created", "model", "choices"]
    for route, extra, choice_keys, streamed_keys, name in (
        (
            "/v1/completions", {"prompt": "x"}, ["index", "text", "logprobs", "finish_reason"],
            ["index", "text", "logprobs", "finish_reason"], "text_completion",
        ),
        (
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
            ["index", "message", "logprobs", "finish_reason"],
            ["index", "delta", "logprobs", "finish_reason"], "chat.completion",
        ),
    ):
        body = {"model": "tiny-lm", "max_tokens": 3, "temperature": 0} | extra
        full = httpx.post(f"{server.url}{route}", json=body, headers=AUTH, timeout=120).json()
        assert list(full) == [*head, "usage"] and full["object"] == name
        assert list(full["choices"][0]) == choice_keys
        assert list(full["usage"]) == ["prompt_tokens", "completion_tokens", "total_tokens"]
        if "message" in choice_keys:
            assert list(full["choices"][0]["message"]) == ["role", "content"]
        stream = body | {"stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}{route}", json=stream, headers=AUTH, timeout=120) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        for chunk in chunks[:-1]:
            assert list(chunk) == head and list(chunk["choices"][0]) == streamed_keys
            assert chunk["object"] == (
                "text_completion" if name == "text_completion" else "chat.completion.chunk"
            )
            assert chunk["id"] == chunks[0]["id"] and chunk["created"] == chunks[0]["created"]
        assert list(chunks[-1]) == [*head, "usage"] and chunks[-1]["choices"] == []


def test_32_concurrent_greedy_requests_equal_single_requests(server, reference):
    _, greedy_text = reference
    prompts = [f"def function_{i}(x):\n    return x * {i}" for i in range(32)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            return await asyncio.gather(
                *[
                    http.post(
                        "/v1/completions",
                        json={"model": "tiny-lm", "prompt": p, "max_tokens": 10 + i % 7, "temperature": 0},
                    )
                    for i, p in enumerate(prompts)
                ]
            )

    responses = asyncio.run(fire())
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == greedy_text(prompt, 10 + i % 7)[0]


BAD_REQUESTS = [
    # (body bytes or json, headers, status, words in the message)
    (b'{"model": "tiny-lm", "prompt": ', AUTH, 400, "not valid JSON"),
    (b"[1, 2]", AUTH, 400, "must be a JSON object"),
    ({"model": "tiny-lm", "prompt": 5}, AUTH, 422, "prompt"),
    ({"model": "tiny-lm", "prompt": "x", "max_tokens": "5"}, AUTH, 422, "max_tokens='5'"),
    ({"model": "tiny-lm", "prompt": "x", "max_tokens": -3}, AUTH, 422, "max_tokens=-3"),
    ({"model": "tiny-lm", "prompt": "x", "temperature": 3.5}, AUTH, 422, "temperature=3.5"),
    ({"model": "tiny-lm", "prompt": "x", "top_p": 0}, AUTH, 422, "top_p=0"),
    ({"model": "tiny-lm"}, AUTH, 422, "missing required field 'prompt'"),
    ({"model": "gpt-4", "prompt": "x"}, AUTH, 404, "model 'gpt-4' does not exist"),
    ({"model": "tiny-lm", "prompt": "word " * 400}, AUTH, 400, "maximum context length is 160 tokens"),
    (
        {"model": "tiny-lm", "prompt": "x", "max_tokens": 500}, AUTH, 400,
        "maximum context length is 160 tokens",
    ),
    ({"model": "tiny-lm", "prompt": [0, 99999]}, AUTH, 400, "outside the vocabulary"),
    ({"model": "tiny-lm", "prompt": "x" * 70_000}, AUTH, 413, "exceeds the limit of 65536 bytes"),
    ({"model": "tiny-lm", "prompt": "x"}, {}, 401, "missing API key"),
    ({"model": "tiny-lm", "prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, "invalid API key"),
    ({"model": "tiny-lm", "prompt": "x"}, {"Authorization": KEY}, 401, "missing API key"),
]


@pytest.mark.parametrize("body,headers,status,words", BAD_REQUESTS)
def test_bad_requests_get_the_right_4xx_and_the_server_keeps_serving(server, body, headers, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server.url}/v1/completions", content=content,
        headers={**headers, "Content-Type": "application/json"}, timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert KEY not in response.text
    ok = httpx.post(
        f"{server.url}/v1/completions", json={"model": "tiny-lm", "prompt": "x", "max_tokens": 2},
        headers=AUTH, timeout=60,
    )
    assert ok.status_code == 200


def test_chat_validation_and_unknown_route(server):
    bad_role = {"model": "tiny-lm", "messages": [{"role": "wizard", "content": "hi"}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=bad_role, headers=AUTH)
    assert response.status_code == 422 and "messages.0.role" in response.json()["error"]["message"]
    empty = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "tiny-lm", "messages": []}, headers=AUTH
    )
    assert empty.status_code == 422
    missing = httpx.get(f"{server.url}/v1/engines", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
fields = st.sampled_from(
    [
        "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
        "stream", "n", "repetition_penalty", "stream_options", "max_completion_tokens",
    ]
)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,  # the same cases every run
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=st.dictionaries(fields, json_values, max_size=6),
    valid_base=st.booleans(),
)
def test_fuzzed_request_schema_never_gives_5xx(server, route, body, valid_base):
    if valid_base:  # start from a valid request so the fuzz also reaches deeper checks
        base = {"model": "tiny-lm", "max_tokens": 3}
        base |= (
            {"prompt": "hi"}
            if route == "/v1/completions"
            else {"messages": [{"role": "user", "content": "hi"}]}
        )
        body = base | body
    response = httpx.post(f"{server.url}{route}", json=body, headers=AUTH, timeout=120)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


def test_health_and_docs_follow_the_key_policy(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # without a key: up or down only
    health = httpx.get(f"{server.url}/health", headers=AUTH)
    assert (
        health.status_code == 200 and health.json()["ready"] is True and health.json()["model"] == "tiny-lm"
    )
    for path in ("/docs", "/redoc", "/openapi.json"):
        refused = httpx.get(f"{server.url}{path}")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
        assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code == 200
    document = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    fields = document["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "logprobs", "echo", "logit_bias", "top_k", "seed", "stop"} <= set(fields)
    assert fields["top_k"]["maximum"] == 2**31 - 1 and fields["seed"]["anyOf"][0]["maximum"] == float(
        2**64 - 1
    )


def test_metrics(server):
    refused = httpx.get(f"{server.url}/metrics")  # keys are set: the scrape needs one too
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
    before = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    generated_before = _metric(before, "sapwood_generated_tokens_total")
    httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny-lm", "prompt": "x", "max_tokens": 5, "temperature": 0},
        headers=AUTH,
    )
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert _metric(text, "sapwood_generated_tokens_total") == generated_before + 5
    for name in (
        "sapwood_requests_total", "sapwood_request_latency_seconds_bucket",
        "sapwood_time_to_first_token_seconds_count", "sapwood_queue_depth", "sapwood_kv_cache_usage_ratio",
    ):
        assert name in text
    assert 'sapwood_requests_total{route="/v1/completions",status="200"}' in text


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


class EngineGate:
    """Test instrumentation on a real engine: after each step its thread waits until ``release`` is set, and
    ``added`` is set once a request has been queued, so a test orders events without timing."""

    def __init__(self, engine: Engine):
        self.stepped, self.added, self.release = threading.Event(), threading.Event(), threading.Event()
        step, add_request = engine.step, engine.add_request

        def gated_step():
            outputs = step()
            self.stepped.set()
            self.release.wait()
            return outputs

        def noted_add(request):
            queued = add_request(request)
            self.added.set()
            return queued

        engine.step, engine.add_request = gated_step, noted_add


def test_full_queue_gives_429_with_retry_after_and_timeouts_give_504(lm_folder):
    settings = ServeSettings(max_batch=1, max_queue=1, request_timeout_s=120)
    engine = build_engine(lm_folder, settings)
    gate = EngineGate(engine)
    with BackgroundServer(
        create_app(lm_folder, settings, api_keys=frozenset(), engine=engine), settings
    ) as server:
        long_request = {"model": "tiny-lm", "prompt": "x", "max_tokens": 150, "temperature": 0}

        async def scenario() -> tuple[httpx.Response, list[int]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                first = asyncio.create_task(http.post("/v1/completions", json=long_request))
                await asyncio.to_thread(gate.stepped.wait)  # the first runs; the engine holds after its step
                gate.added.clear()
                second = asyncio.create_task(http.post("/v1/completions", json=long_request))
                await asyncio.to_thread(gate.added.wait)  # the second waits in the queue (max_batch 1)
                third = await http.post("/v1/completions", json=long_request)  # the queue is full
                gate.release.set()
                done = await asyncio.gather(first, second)
                return third, [r.status_code for r in done]

        try:
            third, others = asyncio.run(scenario())
        finally:
            gate.release.set()
        assert third.status_code == 429 and third.headers["Retry-After"] == "1"
        assert "queue is full" in third.json()["error"]["message"]
        assert others == [200, 200]
    settings = ServeSettings(request_timeout_s=0.05)
    engine = build_engine(lm_folder, settings)
    gate = EngineGate(engine)  # held after the first step: the request cannot finish before its deadline
    with BackgroundServer(
        create_app(lm_folder, settings, api_keys=frozenset(), engine=engine), settings
    ) as slow:
        try:
            response = httpx.post(f"{slow.url}/v1/completions", json=long_request, timeout=60)
            assert response.status_code == 504 and "timed out" in response.json()["error"]["message"]
            assert httpx.get(f"{slow.url}/health").status_code == 200
        finally:
            gate.release.set()


def test_no_keys_binds_loopback_only(caplog):
    with caplog.at_level("WARNING", logger="sapwood.serve"):
        assert resolve_host("0.0.0.0", frozenset()) == "127.0.0.1"
    assert "binding loopback 127.0.0.1" in caplog.text
    assert resolve_host("0.0.0.0", frozenset({"k"})) == "0.0.0.0"


@pytest.fixture(scope="module")
def hf_model(lm_folder, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from sapwood.model.hf import export_hf

    out = tmp_path_factory.mktemp("hf") / "hf"
    export_hf(lm_folder, out)
    return AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of ``ids`` (row i scores token i + 1)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_and_logprobs_equal_transformers_log_softmax(server, reference, hf_model):
    engine, _ = reference
    c = client(server)
    prompt = "def parse(text):\n    return text.split()"
    ids = engine.tokenizer.encode(prompt)
    scored = c.completions.create(model="tiny-lm", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = scored.choices[0]
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    expected = hf_logprobs(hf_model, ids)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert "".join(lp.tokens) == prompt and lp.text_offset[1] == len(lp.tokens[0])
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(expected[i - 1, ids[i]])) < 1e-4
        top3 = expected[i - 1].topk(3).values.tolist()  # alternatives keyed by text: equal texts merge
        assert abs(max(lp.top_logprobs[i].values()) - top3[0]) < 1e-4
        assert all(min(abs(v - t) for t in top3) < 1e-4 for v in lp.top_logprobs[i].values())

    generated = c.completions.create(
        model="tiny-lm", prompt=ids, max_tokens=6, temperature=0, logprobs=2, echo=True
    )
    lp = generated.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 6
    full = ids + engine.generate([ids], SamplingParams(max_tokens=6, temperature=0))[0].output_ids
    assert "".join(lp.tokens[len(ids) :]) == generated.choices[0].text[len(prompt) :]
    expected = hf_logprobs(hf_model, full)
    for i in range(1, len(ids) + 6):
        assert (
            abs(
                lp.token_logprobs[i]
                - float(expected[i - 1].max() if i >= len(ids) else expected[i - 1, full[i]])
            )
            < 1e-4
        )
        assert abs(max(lp.top_logprobs[i].values()) - float(expected[i - 1].max())) < 1e-4

    messages = [{"role": "user", "content": "hello"}]
    chat = c.chat.completions.create(
        model="tiny-lm", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    rendered = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    expected = hf_logprobs(hf_model, rendered + [0] * 5)
    assert abs(content[0].logprob - float(expected[len(rendered) - 1].max())) < 1e-4
    assert content[0].bytes == list(content[0].token.encode())


def test_streamed_logprobs_match_the_response(server):
    c = client(server)
    body = dict(model="tiny-lm", prompt="import os\n", max_tokens=5, temperature=0, logprobs=1)
    full = c.completions.create(**body).choices[0].logprobs
    chunks = [ch for ch in c.completions.create(**body, stream=True) if ch.choices and ch.choices[0].logprobs]
    streamed = [v for ch in chunks for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed == full.token_logprobs and len(streamed) == 5


def test_serve_help_lists_the_endpoints_and_the_default_model_name(tmp_path):
    from typer.testing import CliRunner

    from sapwood.cli import app
    from sapwood.serve.app import default_model_name

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in (
        "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/predict", "/health", "/metrics",
        "SAPWOOD_API_KEYS", "--kv-memory-gb",
    ):
        assert text in result.output, text
    assert default_model_name(tmp_path / "astro" / "final") == "astro"
    assert default_model_name(tmp_path / "astro" / "checkpoints" / "step_300") == "astro"
    assert default_model_name(tmp_path / "tiny-lm") == "tiny-lm"


@pytest.mark.parametrize(
    "model_name", ["tiny-lm", "in-\ufdd0sapwood-text\ufdd1-it", "\ufdd0sapwood-text\ufdd1"]
)
def test_text_only_stream_events_are_the_bytes_of_the_full_rendering(model_name):
    """The per-event fast path (bytes around the text, rendered once) writes exactly what rendering the
    whole event writes, for texts JSON must escape, on both routes; a model named exactly as the placeholder
    is rendered in full every time."""
    from types import SimpleNamespace

    from sapwood.serve.text_api import ChatStream, CompletionStream

    service = SimpleNamespace(model_name=model_name)
    texts = ["plain", "", 'quote " and \\ back', "new\nline\ttab", "émoji 🌲 \u2028", "\x00\x1f", "\ufdd0"]
    for fmt in (CompletionStream(service, False, False, None), ChatStream(service, True, False)):
        for text in texts:
            assert fmt.text_event(text) == fmt.event([fmt.text_choice(text)])
        assert (fmt._around_text is None) == (model_name == fmt.TEXT_MARK)


def test_outputs_delivered_while_the_handler_was_busy_become_one_event():
    """A handler busy writing (its client reads slower than the engine steps) takes every output delivered
    since its last take at once, merged: tokens, text and log-probabilities joined, finished as the last."""
    from sapwood.infer.request import Request, StepOutput
    from sapwood.serve.text_api import OutputBox, merge_outputs

    request = Request([1, 2], SamplingParams(max_tokens=3), None)
    outputs = [
        StepOutput(request, [5], "a", False, [(-0.1, [])]),
        StepOutput(request, [6], "b", False, [(-0.2, [])]),
        StepOutput(request, [7], "", True, [(-0.3, [])]),
    ]

    async def deliver_then_take() -> list[StepOutput]:
        box = OutputBox(timeout_s=60)
        for output in outputs:
            box.put(output)
        taken = await box.take()
        box.close()
        return taken

    taken = asyncio.run(deliver_then_take())
    assert taken == outputs
    merged = merge_outputs(taken)
    assert (merged.new_token_ids, merged.text_delta, merged.finished) == ([5, 6, 7], "ab", True)
    assert merged.new_logprobs == [(-0.1, []), (-0.2, []), (-0.3, [])]
