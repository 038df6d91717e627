"""Demo stage: samples from the trained demo model through the engine, then one request to a real
server with the ``openai`` client (reads ``DEMO/lm/final``, written by the language-model stage)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from sapwood.errors import SapwoodError

console = Console()
PROMPTS = ["def ", "import os\n", "class Parser:\n    def __init__(self"]


def generation_and_serving_stage(out: Path) -> None:
    from sapwood.infer.engine import Engine
    from sapwood.infer.sampling import SamplingParams
    from sapwood.serve.app import create_app
    from sapwood.serve.server import BackgroundServer
    from sapwood.serve.settings import ServeSettings

    folder = Path(out) / "lm" / "final"
    if not (folder / "config.yaml").exists():
        raise SapwoodError(f"{folder}: no trained demo model; the language-model stage writes it first")
    engine = Engine.from_folder(folder)
    params = SamplingParams(
        max_tokens=48, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=0
    )
    for prompt, text in zip(PROMPTS, engine.generate_text(PROMPTS, params), strict=True):
        console.print(f"[bold]{prompt!r}[/bold] -> {text!r}")
    settings = ServeSettings(model_name="sapwood-demo")
    app = create_app(folder, settings, api_keys=frozenset(), engine=engine)
    import openai

    with BackgroundServer(app, settings) as server:
        console.print(f"sapwood serve on {server.url} (loopback, no API keys)")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(
            model="sapwood-demo", prompt="def main():\n", max_tokens=40, temperature=0
        )
        console.print(f"openai client -> {reply.choices[0].text!r}")
        console.print(
            f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens"
        )
    console.print("server shut down (in-flight requests drained)")
