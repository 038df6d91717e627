"""Several LoRA adapters on one served base, for real: uvicorn on a free port, the openai client and httpx."""

import concurrent.futures

import httpx
import openai
import pytest

from sapwood.infer.engine import Engine
from sapwood.infer.sampling import SamplingParams
from sapwood.serve.app import create_app
from sapwood.serve.server import BackgroundServer
from sapwood.serve.settings import ServeSettings

pytest.importorskip("peft")
PROMPT = "def main(argv):"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, lm_folder):
    from test_lora import random_adapter

    from sapwood.model import lora
    from sapwood.model.folder import load

    root = tmp_path_factory.mktemp("served-adapters")
    # B at std 0.5: each adapter moves the greedy continuation of PROMPT well away from the base's, so a
    # request served through the wrong adapter (or none) cannot match by a near-tie
    return {
        name: lora.save_adapter(
            random_adapter(load(lm_folder), name, targets, seed=seed, scale=0.5), name, root / name, lm_folder
        )
        for seed, (name, targets) in enumerate({"math": ("wq", "wv", "w2"), "poem": ("wk", "wo")}.items(), 7)
    }


@pytest.fixture(scope="module")
def server(lm_folder, adapters, one_thread):
    settings = ServeSettings(
        model_name="base", max_batch=8, lora_adapters={name: str(folder) for name, folder in adapters.items()}
    )
    with BackgroundServer(create_app(lm_folder, settings, api_keys=frozenset()), settings) as running:
        yield running


def solo_completion(lm_folder, adapters, name, max_tokens):
    """The greedy completion of PROMPT by an engine that serves only ``name`` (or the base)."""
    engine = Engine.from_folder(lm_folder)
    if name != "base":
        engine.load_adapter(name, adapters[name])
    prompt = engine.tokenizer.encode(PROMPT)
    request = engine.generate(
        [prompt],
        SamplingParams(max_tokens=max_tokens, greedy=True, ignore_eos=True),
        adapters=[None if name == "base" else name],
    )[0]
    return request.stream.text


def test_models_lists_the_base_and_its_adapters(server):
    listed = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [(m["id"], m.get("parent")) for m in listed] == [
        ("base", None),
        ("math", "base"),
        ("poem", "base"),
    ]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["base", "math", "poem"]


def test_concurrent_requests_for_different_adapters_equal_each_adapter_alone(server, lm_folder, adapters):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    names = ["base", "math", "poem"] * 4

    def complete(name):
        reply = client.completions.create(
            model=name, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        return reply.model, reply.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(complete, names))
    expected = {name: solo_completion(lm_folder, adapters, name, 10) for name in ("base", "math", "poem")}
    assert len(set(expected.values())) == 3  # the adapters really differ
    for name, (model, text) in zip(names, replies, strict=True):
        assert model == name and text == expected[name]
    stream = client.chat.completions.create(
        model="poem", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert {chunk.model for chunk in stream} == {"poem"}


def test_an_unknown_model_is_a_404_naming_what_is_served(server):
    response = httpx.post(
        f"{server.url}/v1/completions", json={"model": "mth", "prompt": "x", "max_tokens": 1}
    )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "'base', 'math', 'poem'" in error["message"]


def test_cli_refuses_malformed_lora_options_in_one_line(lm_folder, tmp_path, capsys):
    from sapwood.cli import main

    for option, words in (
        ("math", "expected NAME=ADAPTER_DIR"),
        (f"x={tmp_path}", "not a PEFT adapter folder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", str(lm_folder), "--port", "0", "--lora", option])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err and err.count("\n") == 1
