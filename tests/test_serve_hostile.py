"""A server that survives hostile clients: an OpenAPI-driven fuzzer (schemathesis), a table of hostile
inputs, fault isolation in the engine, and a loopback load test with disconnecting clients. Every test
runs a real uvicorn server on loopback and talks to it over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import pytest
import schemathesis
from conftest import make_lm_folder
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from sapwood.infer import Engine, SamplingParams
from sapwood.serve.app import create_app
from sapwood.serve.server import BackgroundServer
from sapwood.serve.settings import ServeSettings

KEY = "hostile-test-key-not-a-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
NORMAL = {"model": "tiny-lm", "prompt": "def main():", "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def server(lm_folder):
    settings = ServeSettings(max_batch=16)  # the default 1 MiB body limit: hostile bodies reach the parser
    with BackgroundServer(create_app(lm_folder, settings, api_keys=frozenset({KEY})), settings) as running:
        yield running


def still_serving(url: str) -> None:
    """A normal request is answered within seconds and /health says 200."""
    started = time.monotonic()
    ok = httpx.post(f"{url}/v1/completions", json=NORMAL, headers=AUTH, timeout=30)
    assert ok.status_code == 200, ok.text
    assert time.monotonic() - started < 30
    health = httpx.get(f"{url}/health", headers=AUTH, timeout=10)
    assert health.status_code == 200 and health.json()["ready"] is True


def deep(levels: int) -> bytes:
    return b'{"model": "tiny-lm", "prompt": "x", "user": ' + b"[" * levels + b"]" * levels + b"}"


# (name, raw body, expected status, words in the error message)
HOSTILE = [
    ("top_k beyond uint64", {"prompt": "x", "top_k": 18446744073709551616}, 422, "top_k"),
    ("top_k beyond the vocabulary", {"prompt": "x", "top_k": 100_000}, 400, "vocabulary size"),
    ("seed above 2**64", {"prompt": "x", "seed": 2**64 + 5}, 422, "seed"),
    ("JSON nested 100,000 deep", deep(100_000), 400, "nested deeper"),
    ("JSON nested 40 deep", deep(40), 400, "nested deeper than the limit of 32"),
    ("integer of 5,000 digits", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, "5000 digits"),
    ("float beyond float64", b'{"prompt": "x", "temperature": 1e999}', 400, "outside the float64 range"),
    ("NaN literal", b'{"prompt": "x", "temperature": NaN}', 400, "NaN is not a JSON number"),
    ("Infinity literal", b'{"prompt": "x", "top_p": Infinity}', 400, "Infinity is not a JSON number"),
    ("junk logit_bias key", {"prompt": "x", "logit_bias": {"junk": 1}}, 422, "logit_bias.junk"),
    ("huge logit_bias value", {"prompt": "x", "logit_bias": {"5": 1e30}}, 422, "logit_bias.5"),
    (
        "logit_bias outside the vocabulary", {"prompt": "x", "logit_bias": {"999999": 1}}, 400,
        "outside the vocabulary",
    ),
    (
        "four 200,000-character stop strings", {"prompt": "x", "stop": ["ab" * 100_000] * 4}, 422,
        "at most 256 characters",
    ),
    ("one 300-character stop string", {"prompt": "x", "stop": ["s" * 300]}, 422, "at most 256 characters"),
    ("five stop strings", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "at most 4 strings"),
    ("n=2", {"prompt": "x", "n": 2}, 422, "n=2"),
    ("token id beyond int32", {"prompt": [1, 2**40]}, 422, "prompt"),
    ("max_tokens 2**63", {"prompt": "x", "max_tokens": 2**63}, 422, "max_tokens"),
    ("max_tokens 0 without echo", {"prompt": "x", "max_tokens": 0}, 422, "only allowed with echo"),
    ("logprobs 1000", {"prompt": "x", "logprobs": 1000}, 422, "logprobs=1000"),
    ("a 10,000-character model name", {"prompt": "x", "model": "m" * 10_000}, 422, "model="),
    ("5,000 chat messages", None, 422, "messages"),
    ("body null", b"null", 400, "must be a JSON object"),
    ("body a string", b'"hello"', 400, "must be a JSON object"),
    ("empty body", b"", 400, "must be a JSON object"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400, "not valid JSON"),
]


@pytest.mark.parametrize("name, body, status, words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_a_4xx_and_the_server_keeps_serving(server, name, body, status, words):
    route = "/v1/completions"
    if body is None:
        route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 5000}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server.url}{route}", content=content, headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text[:300]
    message = response.json()["error"]["message"]
    assert words in message and "\n" not in message and len(message) < 400, message
    still_serving(server.url)


def test_temperature_below_epsilon_is_greedy(server, lm_folder):
    """temperature 1e-300 is 0 in float32 (NaN probabilities if divided); it is served as argmax."""
    engine = Engine.from_folder(lm_folder)
    greedy = engine.generate(
        [engine.tokenizer.encode("def main():")], SamplingParams(max_tokens=8, temperature=0)
    )
    response = httpx.post(
        f"{server.url}/v1/completions", headers=AUTH, timeout=60,
        json={**NORMAL, "max_tokens": 8, "temperature": 1e-300},
    )
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == greedy[0].stream.text


# --- the OpenAPI-driven fuzzer ------------------------------------------------------------------------------


def fuzz_operations(url: str, headers: dict[str, str]):
    document = httpx.get(f"{url}/openapi.json", headers=headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    return [result.ok() for result in schema.get_all_operations()]


def run_fuzzer(url: str, headers: dict[str, str], examples: int) -> list[str]:
    """Every operation, positive and negative cases; returns 'METHOD PATH' of the operations run."""
    ran = []
    for operation in fuzz_operations(url, headers):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=examples, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case) -> None:
                response = case.call(base_url=url, headers=headers, timeout=60)
                case.validate_response(response, checks=[not_a_server_error])
                if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                    assert response.json()["error"]["message"]

            try:
                fuzz()
            except Unsatisfiable:  # an operation without inputs has no invalid case to generate
                assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
        ran.append(f"{operation.method.upper()} {operation.path}")
    return ran


def test_openapi_fuzzer_finds_no_server_error_on_the_text_api(tmp_path):
    """A model with a 48-token context, so that generated requests finish fast whatever they ask for."""
    folder = make_lm_folder(tmp_path, trained_context=32, max_context=48)
    settings = ServeSettings()
    with BackgroundServer(create_app(folder, settings, api_keys=frozenset({KEY})), settings) as running:
        ran = run_fuzzer(running.url, AUTH, examples=30)
        assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health"} <= set(
            ran
        )
        still_serving(running.url)


def test_openapi_fuzzer_finds_no_server_error_on_predict(tmp_path):
    from sapwood.config import Config, CubeModelConfig, ModelConfig
    from sapwood.model import build_model, save_folder

    params = ["planet_radius", "gravity", "rotation_rate", "stellar_flux", "mean_surface_pressure"]
    config = Config(
        model=ModelConfig(vocab_size=1, hidden=32, layers=1, heads=2, ffn=64),
        cube=CubeModelConfig(levels=2, lat=4, lon=8, patch=2, planet_params=params),
    )
    folder = save_folder(build_model(config), config, tmp_path / "surrogate")
    settings = ServeSettings()
    with BackgroundServer(create_app(folder, settings, api_keys=frozenset({KEY})), settings) as running:
        ran = run_fuzzer(running.url, AUTH, examples=30)
        assert "POST /v1/predict" in ran
        assert httpx.get(f"{running.url}/health", headers=AUTH).status_code == 200


# --- fault isolation ----------------------------------------------------------------------------------------


def test_a_failing_step_fails_only_its_batch_and_a_dead_loop_says_why(lm_folder):
    """Faults injected into the real engine: a forward that raises once fails that batch with a JSON 500 and
    the next request is served; an engine loop that keeps failing stays down, /health says 503 with the
    reason and new requests get 503 at once (never a silent queue)."""
    settings = ServeSettings()
    app = create_app(lm_folder, settings, api_keys=frozenset())
    engine = app.state.engine_loop.engine
    decode = engine.runner.decode
    faults = {"decode": 1}

    def flaky_decode(*args, **kwargs):
        if faults["decode"]:
            faults["decode"] -= 1
            raise RuntimeError("injected fault")
        return decode(*args, **kwargs)

    engine.runner.decode = flaky_decode
    with BackgroundServer(app, settings) as running:
        failed = httpx.post(f"{running.url}/v1/completions", json=NORMAL, timeout=60)
        assert failed.status_code == 500 and "inference step failed" in failed.json()["error"]["message"]
        assert httpx.post(f"{running.url}/v1/completions", json=NORMAL, timeout=60).status_code == 200
        assert httpx.get(f"{running.url}/health").status_code == 200

        def broken_step():
            raise RuntimeError("injected loop fault")

        engine.step = broken_step
        for _ in range(app.state.engine_loop.max_restarts + 1):
            response = httpx.post(f"{running.url}/v1/completions", json=NORMAL, timeout=60)
            assert response.status_code in (500, 503)
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and "engine loop failed" in health.json()["reason"]
        started = time.monotonic()
        refused = httpx.post(f"{running.url}/v1/completions", json=NORMAL, timeout=60)
        assert refused.status_code == 503 and "engine is down" in refused.json()["error"]["message"]
        assert time.monotonic() - started < 5


# --- load ---------------------------------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def load(url: str, clients: int, max_tokens: int, submitted: dict[str, threading.Event]) -> dict:
    """``clients`` concurrent clients, half streaming; a quarter (half of them streaming) disconnect mid-way:
    a streaming one after its third event, a non-streaming one once the server has handed its prompt to
    the engine (``submitted[prompt]`` is set then), so no request reaches the server after its client left."""
    statuses, disconnected = [], 0
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120, limits=limits) as http:

        async def client(i: int) -> None:
            nonlocal disconnected
            body = {
                **NORMAL, "prompt": f"def function_{i}(x):", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": i % 2 == 0,
            }
            leave = i % 8 >= 6
            if body["stream"]:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    statuses.append(response.status_code)
                    events = 0
                    async for line in response.aiter_lines():
                        events += line.startswith("data: ")
                        if leave and events == 3:
                            disconnected += 1
                            return  # leaving the block closes the connection mid-stream
            elif leave:
                posted = asyncio.ensure_future(http.post("/v1/completions", json=body))
                assert await asyncio.to_thread(submitted[body["prompt"]].wait, 120)
                posted.cancel()  # closes the connection while the engine runs the request
                with contextlib.suppress(asyncio.CancelledError):
                    await posted
                disconnected += 1
            else:
                statuses.append((await http.post("/v1/completions", json=body)).status_code)

        await asyncio.gather(*[client(i) for i in range(clients)])
    return {"statuses": statuses, "disconnected": disconnected}


@pytest.mark.slow
def test_64_clients_with_disconnects_leave_no_5xx_and_free_every_slot(lm_folder):
    import psutil

    settings = ServeSettings(max_batch=64)
    app = create_app(lm_folder, settings, api_keys=frozenset({KEY}))
    engine_loop = app.state.engine_loop
    tokenizer = engine_loop.engine.tokenizer
    submitted = {f"def function_{i}(x):": threading.Event() for i in range(64)}
    by_ids = {tuple(tokenizer.encode(prompt)): event for prompt, event in submitted.items()}
    submit, requests = engine_loop.submit, {}

    def recording_submit(prompt_ids, *args, **kwargs):
        request = submit(prompt_ids, *args, **kwargs)
        requests[tuple(prompt_ids)] = request
        if tuple(prompt_ids) in by_ids:
            by_ids[tuple(prompt_ids)].set()
        return request

    engine_loop.submit = recording_submit
    with BackgroundServer(app, settings) as running:
        asyncio.run(load(running.url, 8, 4, submitted))  # warm-up: allocator and caches at their working size
        assert engine_loop.wait_idle(timeout=120)
        for event in submitted.values():
            event.clear()
        rss_before = psutil.Process().memory_info().rss
        result = asyncio.run(load(running.url, 64, 48, submitted))
        assert result["disconnected"] == 16
        assert all(status == 200 for status in result["statuses"]), result["statuses"]
        # every request reached the engine before its client went: once the engine runs dry (the loop
        # thread signals it), nothing is left to arrive
        assert engine_loop.wait_idle(timeout=120), "the engine did not run dry after the clients left"
        left = [requests[tuple(tokenizer.encode(f"def function_{i}(x):"))] for i in range(64) if i % 8 >= 6]
        assert all(r.finish_reason == "cancelled" and len(r.output_ids) < 48 for r in left), [
            (r.finish_reason, len(r.output_ids)) for r in left
        ]
        text = httpx.get(f"{running.url}/metrics", headers=AUTH).text
        assert metric(text, "sapwood_running_requests") == 0 and metric(text, "sapwood_queue_depth") == 0
        assert metric(text, "sapwood_kv_cache_usage_ratio") == 0.0
        assert 'status="5' not in text  # no 5xx of any route
        assert engine_loop.engine.runner.cache.bytes_allocated == 0  # the cache shrank back
        rss_after = psutil.Process().memory_info().rss
        assert rss_after < rss_before + 64 * 2**20, (rss_before, rss_after)
        still_serving(running.url)


def test_a_request_that_can_never_fit_the_kv_budget_is_a_413_even_first(lm_folder):
    """The tiny model's cache takes 2 layers x 2 x 2 kv heads x 16 x 4 bytes = 512 bytes per position and row;
    a budget of 4 rows x 64 positions (131,072 bytes) holds short requests but never one of 100 positions."""
    settings = ServeSettings(kv_memory_gb=131_072 / 1e9)
    with BackgroundServer(create_app(lm_folder, settings, api_keys=frozenset()), settings) as running:
        refused = httpx.post(
            f"{running.url}/v1/completions", timeout=60, json={**NORMAL, "prompt": [5] * 40, "max_tokens": 60}
        )
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert error["code"] == "kv_budget_exceeded" and "MiB of KV cache (100 positions)" in error["message"]
        assert httpx.post(f"{running.url}/v1/completions", json=NORMAL, timeout=60).status_code == 200
