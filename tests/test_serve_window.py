"""Serving past the maximum context with attention sinks + a sliding window (``--context-overflow window``):
refused without the option, served with it (completions and chat, streaming and not) with at most
``sinks + window`` cached positions per request, the normal path's greedy output while the request fits the
window, exactly StreamingLLM's logits after evictions, and cancelled requests freed at the next step."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch

from sapwood.config import validate
from sapwood.errors import ConfigError, SapwoodError
from sapwood.infer import Engine, SamplingParams
from sapwood.infer.scheduler import QueueFullError
from sapwood.infer.window import stream_logits
from sapwood.serve.app import create_app
from sapwood.serve.server import BackgroundServer
from sapwood.serve.settings import ServeSettings

SINKS, WINDOW = 4, 28  # the tiny model's max_context is 160
CAPACITY = SINKS + WINDOW
LONG_PROMPT = [(7 * i) % 90 + 5 for i in range(150)]  # 150 tokens; + 30 new ones passes max_context


@pytest.fixture(scope="module")
def windowed_server(lm_folder):
    settings = ServeSettings(context_overflow="window", sinks=SINKS, window=WINDOW, window_requests=2)
    app = create_app(lm_folder, settings, api_keys=frozenset())
    with BackgroundServer(app, settings) as running:
        running.engine = app.state.engine_loop.engine
        yield running


@pytest.fixture(scope="module")
def plain_server(lm_folder):
    settings = ServeSettings()
    with BackgroundServer(create_app(lm_folder, settings, api_keys=frozenset()), settings) as running:
        yield running


@pytest.fixture(scope="module")
def engine(lm_folder):
    engine = Engine.from_folder(lm_folder)
    engine.enable_window(SINKS, WINDOW, max_requests=2)
    engine.windowed.prefill_tokens_per_step = 16  # long prompts span several engine steps
    return engine


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def test_past_max_context_is_refused_without_the_option_and_served_with_it(plain_server, windowed_server):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 160 tokens"):
        client(plain_server).completions.create(model=None, prompt=LONG_PROMPT, max_tokens=30, **GREEDY)
    windowed = windowed_server.engine.windowed
    windowed.peak_positions = 0
    result = client(windowed_server).completions.create(
        model=None, prompt=LONG_PROMPT, max_tokens=30, **GREEDY
    )
    assert result.usage.prompt_tokens == 150 and result.usage.completion_tokens == 30
    assert result.choices[0].finish_reason == "length"
    assert windowed.peak_positions == CAPACITY  # the window filled, and never held more
    chunks = client(windowed_server).completions.create(
        model=None, prompt=LONG_PROMPT, max_tokens=30, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in chunks) == result.choices[0].text
    assert windowed.count == 0 and windowed_server.engine.runner.cache.bytes_allocated == 0


def test_chat_past_max_context_streaming_equals_non_streaming(plain_server, windowed_server):
    messages = [{"role": "user", "content": " ".join(f"word{i}" for i in range(60))}]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client(plain_server).chat.completions.create(
            model="tiny-lm", messages=messages, max_tokens=40, **GREEDY
        )
    windowed = windowed_server.engine.windowed
    windowed.peak_positions = 0
    result = client(windowed_server).chat.completions.create(
        model="tiny-lm", messages=messages, max_tokens=40, **GREEDY
    )
    assert result.usage.prompt_tokens + 40 > 160 and result.usage.completion_tokens == 40
    assert 0 < windowed.peak_positions <= CAPACITY
    chunks = client(windowed_server).chat.completions.create(
        model="tiny-lm", messages=messages, max_tokens=40, stream=True, **GREEDY
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == result.choices[0].message.content
    )


def test_while_the_request_fits_the_window_greedy_output_equals_the_normal_path(
    plain_server, windowed_server
):
    prompt = LONG_PROMPT[:10]
    fits = CAPACITY - len(prompt) + 1  # tokens generated before the first eviction
    normal = client(plain_server).completions.create(
        model=None, prompt=prompt, max_tokens=fits, logprobs=0, **GREEDY
    )
    long = client(windowed_server).completions.create(
        model=None, prompt=prompt, max_tokens=200, logprobs=0, **GREEDY
    )
    assert long.usage.completion_tokens == 200  # 210 positions > 160: windowed
    assert long.choices[0].logprobs.tokens[:fits] == normal.choices[0].logprobs.tokens
    assert long.choices[0].logprobs.token_logprobs[:fits] == pytest.approx(
        normal.choices[0].logprobs.token_logprobs, abs=1e-4
    )


def test_served_tokens_are_streamingllm_greedy_and_the_cache_stays_bounded(engine):
    """Token by token against :func:`stream_logits` over prompt + output (the reference streaming loop)."""
    request = engine.add_request(
        engine.make_request(LONG_PROMPT, SamplingParams(40, temperature=0, logprobs=0))
    )
    held = []
    while engine.has_work:
        engine.step()
        held += [e.cache.keys[0].shape[2] for e in engine.windowed._active if e.cache.keys[0] is not None]
    assert max(held) == CAPACITY and request.finish_reason == "length" and len(request.output_ids) == 40
    tokens = torch.tensor(LONG_PROMPT + request.output_ids)
    logits = stream_logits(engine.model, tokens[:-1], SINKS, WINDOW)[len(LONG_PROMPT) - 1 :]
    assert logits.argmax(-1).tolist() == request.output_ids
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(request.output_ids)[:, None])[:, 0]
    assert [lp for lp, _ in request.output_logprobs] == pytest.approx(expected.tolist(), abs=1e-4)


def test_echo_scores_a_prompt_past_max_context_as_streamingllm(engine):
    params = SamplingParams(0, temperature=0, logprobs=0, prompt_logprobs=True)
    request = engine.generate([LONG_PROMPT + LONG_PROMPT[:40]], params)[0]
    tokens = torch.tensor(LONG_PROMPT + LONG_PROMPT[:40])
    expected = torch.log_softmax(stream_logits(engine.model, tokens[:-1], SINKS, WINDOW), -1)
    expected = expected.gather(1, tokens[1:, None])[:, 0]
    assert request.finish_reason == "length" and request.output_ids == []
    assert [lp for lp, _ in request.prompt_logprobs] == pytest.approx(expected.tolist(), abs=1e-4)


def test_cancelling_a_windowed_request_frees_it_at_the_next_step_and_the_bound_gives_429(engine):
    running = SamplingParams(100, ignore_eos=True)  # still running when cancelled: no sampled EOS ends it
    requests = [engine.add_request(engine.make_request(LONG_PROMPT, running)) for _ in range(2)]
    with pytest.raises(QueueFullError, match="2 requests past the maximum context are running"):
        engine.add_request(engine.make_request(LONG_PROMPT, running))
    engine.step()
    engine.cancel(requests[0])
    outputs = engine.step()
    assert [o.request for o in outputs if o.finished] == [requests[0]] and requests[
        0
    ].finish_reason == "cancelled"
    assert engine.windowed.count == 1
    engine.cancel(requests[1])
    engine.step()
    assert engine.windowed.count == 0 and not engine.has_work


def test_a_client_that_leaves_mid_stream_frees_its_window(windowed_server):
    body = {"prompt": LONG_PROMPT, "max_tokens": 100_000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{windowed_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):  # generating: counted as running
                assert httpx.get(f"{windowed_server.url}/health").json()["running"] == 1
                break  # leaving the loop closes the stream: the client is gone
    windowed, deadline = windowed_server.engine.windowed, time.monotonic() + 30
    while windowed.count:  # the server sees the disconnect, the next engine step drops the request
        assert time.monotonic() < deadline, "the windowed request still runs after its client left"
        time.sleep(0.05)
    assert "sapwood_running_requests 0.0" in httpx.get(f"{windowed_server.url}/metrics").text
    result = client(windowed_server).completions.create(
        model=None, prompt=LONG_PROMPT, max_tokens=12, **GREEDY
    )
    assert result.usage.completion_tokens == 12


def test_bad_window_settings_are_one_line_errors(lm_folder):
    engine = Engine.from_folder(lm_folder)
    with pytest.raises(SapwoodError, match=r"--sinks 4 --window 157: need .* sinks \+ window <= 160"):
        engine.enable_window(4, 157)
    with pytest.raises(ConfigError, match="context_overflow"):
        validate(ServeSettings, {"context_overflow": "slide"}, "serve: ")


def test_a_request_past_the_whole_kv_budget_is_windowed_too(lm_folder):
    """512 bytes per position and row, a budget of 4 rows x 64 positions: 100 positions never fit the batched
    cache (a 413 without the window), so the request runs through the window instead."""
    from sapwood.infer.scheduler import SchedulerConfig

    engine = Engine.from_folder(lm_folder, SchedulerConfig(kv_memory_bytes=131_072))
    engine.enable_window(SINKS, WINDOW)
    short, long = SamplingParams(8, temperature=0), SamplingParams(90, temperature=0)
    assert not engine.windowed.takes(10, short) and engine.windowed.takes(10, long)
    requests = engine.generate([LONG_PROMPT[:10], LONG_PROMPT[:10]], [short, long])
    assert [len(r.output_ids) for r in requests] == [8, 90] and engine.windowed.served == 1
    assert requests[1].output_ids[:8] == requests[0].output_ids  # no eviction yet: the batched path's tokens


def test_the_engine_loop_cancels_windowed_requests_at_shutdown_and_fails_them_when_a_step_fails(lm_folder):
    import threading

    from sapwood.infer.background import EngineLoop

    engine = Engine.from_folder(lm_folder)
    engine.enable_window(SINKS, WINDOW)
    step, broken = engine.step, threading.Event()

    def step_that_may_fail():
        if broken.is_set():
            broken.clear()
            raise RuntimeError("injected step failure")
        return step()

    engine.step = step_that_may_fail
    loop = EngineLoop(engine).start()
    try:
        for ending in ("error", "cancelled"):
            started, finished = threading.Event(), threading.Event()

            def on_output(output, started=started, finished=finished):
                started.set()
                if output.finished:
                    finished.set()

            request = loop.submit(LONG_PROMPT, SamplingParams(100_000, ignore_eos=True), on_output)
            assert started.wait(60) and engine.windowed.count == 1
            if ending == "error":
                broken.set()  # the next step raises: the loop fails every pending request and restarts
            else:
                loop.stop(drain=False, timeout=60)  # shutting down: windowed requests are cancelled too
            assert finished.wait(60) and request.finish_reason == ending
            assert engine.windowed.count == 0
    finally:
        loop.stop(drain=False, timeout=60)
