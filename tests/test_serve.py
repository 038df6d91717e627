"""The HTTP server, for real: uvicorn on a free loopback port, the `openai` client and httpx."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sapwood.infer import Engine, SamplingParams
from sapwood.serve.app import create_app
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
        request = engine.generate([engine.tokenizer.encode(prompt)], SamplingParams(max_tokens, temperature=0))[0]
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
    chunks = list(c.completions.create(model="tiny-lm", prompt=prompt, max_tokens=15, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == greedy_text(prompt, 15)[0]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15

    messages = [{"role": "user", "content": "count"}]
    stream = c.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=9, temperature=0, stream=True)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    streamed = "".join(p.choices[0].delta.content or "" for p in parts)
    full = c.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=9, temperature=0)
    assert streamed == full.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


def test_32_concurrent_greedy_requests_equal_single_requests(server, reference):
    _, greedy_text = reference
    prompts = [f"def function_{i}(x):\n    return x * {i}" for i in range(32)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
            return await asyncio.gather(*[
                http.post("/v1/completions", json={"model": "tiny-lm", "prompt": p, "max_tokens": 10 + i % 7,
                                                   "temperature": 0})
                for i, p in enumerate(prompts)
            ])

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
    ({"prompt": "x"}, AUTH, 422, "missing required field 'model'"),
    ({"model": "gpt-4", "prompt": "x"}, AUTH, 404, "model 'gpt-4' does not exist"),
    ({"model": "tiny-lm", "prompt": "word " * 400}, AUTH, 400, "maximum context length is 160 tokens"),
    ({"model": "tiny-lm", "prompt": "x", "max_tokens": 500}, AUTH, 400, "maximum context length is 160 tokens"),
    ({"model": "tiny-lm", "prompt": [0, 99999]}, AUTH, 400, "outside the vocabulary"),
    ({"model": "tiny-lm", "prompt": "x" * 70_000}, AUTH, 413, "exceeds the limit of 65536 bytes"),
    ({"model": "tiny-lm", "prompt": "x"}, {}, 401, "missing API key"),
    ({"model": "tiny-lm", "prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, "invalid API key"),
    ({"model": "tiny-lm", "prompt": "x"}, {"Authorization": KEY}, 401, "missing API key"),
]


@pytest.mark.parametrize("body,headers,status,words", BAD_REQUESTS)
def test_bad_requests_get_the_right_4xx_and_the_server_keeps_serving(server, body, headers, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={**headers, "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert KEY not in response.text
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-lm", "prompt": "x", "max_tokens": 2},
                    headers=AUTH, timeout=60)
    assert ok.status_code == 200


def test_chat_validation_and_unknown_route(server):
    bad_role = {"model": "tiny-lm", "messages": [{"role": "wizard", "content": "hi"}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=bad_role, headers=AUTH)
    assert response.status_code == 422 and "messages.0.role" in response.json()["error"]["message"]
    empty = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny-lm", "messages": []}, headers=AUTH)
    assert empty.status_code == 422
    missing = httpx.get(f"{server.url}/v1/engines", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
fields = st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop",
                          "seed", "stream", "n", "repetition_penalty", "stream_options", "max_completion_tokens"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(fields, json_values, max_size=6),
       valid_base=st.booleans())
def test_fuzzed_request_schema_never_gives_5xx(server, route, body, valid_base):
    if valid_base:  # start from a valid request so the fuzz also reaches deeper checks
        base = {"model": "tiny-lm", "max_tokens": 3}
        base |= {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
        body = base | body
    response = httpx.post(f"{server.url}{route}", json=body, headers=AUTH, timeout=120)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


def test_health_and_metrics(server):
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["ready"] is True and health.json()["live"] is True
    before = httpx.get(f"{server.url}/metrics").text
    generated_before = _metric(before, "sapwood_generated_tokens_total")
    httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-lm", "prompt": "x", "max_tokens": 5,
                                                     "temperature": 0}, headers=AUTH)
    text = httpx.get(f"{server.url}/metrics").text
    assert _metric(text, "sapwood_generated_tokens_total") == generated_before + 5
    for name in ("sapwood_requests_total", "sapwood_request_latency_seconds_bucket",
                 "sapwood_time_to_first_token_seconds_count", "sapwood_queue_depth", "sapwood_kv_cache_usage_ratio"):
        assert name in text
    assert 'sapwood_requests_total{route="/v1/completions",status="200"}' in text


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_full_queue_gives_429_with_retry_after_and_timeouts_give_504(lm_folder):
    settings = ServeSettings(max_batch=1, max_queue=1, request_timeout_s=30)
    with BackgroundServer(create_app(lm_folder, settings, api_keys=frozenset()), settings) as server:
        long_request = {"model": "tiny-lm", "prompt": "x", "max_tokens": 150, "temperature": 0}

        async def scenario() -> tuple[int, httpx.Response, list[int]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                first = asyncio.create_task(http.post("/v1/completions", json=long_request))
                await _until(http, lambda h: h["running"] == 1)
                second = asyncio.create_task(http.post("/v1/completions", json=long_request))
                await _until(http, lambda h: h["queued"] == 1)
                third = await http.post("/v1/completions", json=long_request)
                done = await asyncio.gather(first, second)
                return third.status_code, third, [r.status_code for r in done]

        status, third, others = asyncio.run(scenario())
        assert status == 429 and third.headers["Retry-After"] == "1"
        assert "queue is full" in third.json()["error"]["message"]
        assert others == [200, 200]
        settings_timeout = ServeSettings(request_timeout_s=0.05)
        app = create_app(lm_folder, settings_timeout, api_keys=frozenset())
    with BackgroundServer(app, settings_timeout) as slow:
        response = httpx.post(f"{slow.url}/v1/completions", json=long_request, timeout=60)
        assert response.status_code == 504 and "timed out" in response.json()["error"]["message"]
        assert httpx.get(f"{slow.url}/health").status_code == 200


async def _until(http: httpx.AsyncClient, condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition((await http.get("/health")).json()):
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


def test_no_keys_binds_loopback_only(caplog):
    with caplog.at_level("WARNING", logger="sapwood.serve"):
        assert resolve_host("0.0.0.0", frozenset()) == "127.0.0.1"
    assert "binding loopback 127.0.0.1" in caplog.text
    assert resolve_host("0.0.0.0", frozenset({"k"})) == "0.0.0.0"
