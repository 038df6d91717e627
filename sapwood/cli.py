"""The ``sapwood`` command line (typer). Each command is a thin shell over its module.

User errors (:class:`sapwood.errors.SapwoodError`) print one line and exit with code 2.
Imports of heavy modules happen inside commands so ``sapwood --help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _ctrl_c_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C while ``sapwood`` imports its modules and parses its arguments: one line and exit 130 (not a
    traceback); :func:`end_start_up` hands Ctrl-C back to Python before a command runs, and each command
    decides."""
    os.write(2, b"interrupted while sapwood was starting; nothing was written\n")
    raise SystemExit(130)


if __name__ == "__main__" or Path(sys.argv[0]).name == "sapwood":  # the program, not an import
    signal.signal(signal.SIGINT, _ctrl_c_while_starting)

import typer  # noqa: E402 (after the Ctrl-C handler: these imports are most of the start-up time)
from rich.console import Console  # noqa: E402

from sapwood.errors import SapwoodError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Size, build, grow, train and serve large transformers.")
bench_app = typer.Typer(
    no_args_is_help=True, help="Benchmarks: ours vs a baseline in the same run (JSON + PNG)."
)
app.add_typer(bench_app, name="bench")
console = Console()


@app.command()
def create(
    preset: str,
    out: Path = typer.Option(..., "--out", help="checkpoint folder to write"),
    force: bool = typer.Option(False, "--force", help="replace --out when it already holds files"),
) -> None:
    """Write an initialized checkpoint folder for PRESET (a preset name or YAML)."""
    from sapwood.config import load_config
    from sapwood.model import build_model, save_folder
    from sapwood.sizing import check_create_fits

    refuse_existing_out(out, force)
    config = load_config(preset)
    check_create_fits(config)  # refuses before anything is allocated
    model = build_model(config)
    save_folder(model, config, out)
    console.print(f"wrote {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="folder for everything the demo writes (a rerun "
                             "replaces the earlier demo there)"),
    only: str = typer.Option(None, "--only", help="comma-separated stages: sizing, lm, serving, sft, cubes, "
                             "surrogate (serving and sft need lm, surrogate needs cubes, run before)"),
) -> None:
    """Run the whole pipeline end to end on embedded defaults (CPU, minutes).

    Ctrl-C stops the demo (a training stage after its current step), prints the command that reruns the
    interrupted stage and the ones after it, and exits 130."""
    from sapwood.demo import DemoInterrupted, run_demo

    try:
        run_demo(out, [name.strip() for name in only.split(",") if name.strip()] if only else None)
    except DemoInterrupted as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(130) from None


@app.command("import-hf")
def import_hf_command(
    hf_dir: Path,
    out: Path = typer.Option(..., "--out", help="sapwood checkpoint folder to write"),
    dtype: str = typer.Option(None, help="cast the weights: float32, bfloat16 or float16 (default: keep)"),
) -> None:
    """Convert a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Phi-3 folder (config.json, *.safetensors,
    tokenizer and generation files)."""
    from sapwood.model.hf import import_hf

    console.print(f"wrote {import_hf(hf_dir, out, dtype)}")


@app.command("export-hf")
def export_hf_command(
    folder: Path,
    out: Path = typer.Option(..., "--out", help="Hugging Face folder to write"),
    force: bool = typer.Option(False, "--force", help="replace --out when it already holds files"),
) -> None:
    """Write a sapwood checkpoint folder as one transformers loads (Llama, Qwen2, Qwen3 or Phi3 by its
    options)."""
    from sapwood.model.hf import export_hf

    refuse_existing_out(out, force)
    console.print(f"wrote {export_hf(folder, out)}")


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="folder for the NetCDF files (run_NNNN.nc)"),
    runs: int = typer.Option(8, help="ensemble members (planets)"),
    times: int = typer.Option(24, help="output times per run"),
    levels: int = typer.Option(4, help="sigma layers (the cube-tiny preset's grid: 4 x 16 x 32)"),
    nlat: int = typer.Option(16, help="latitudes"),
    nlon: int = typer.Option(32, help="longitudes"),
    dt_hours: float = typer.Option(6.0, help="hours between outputs"),
    seed: int = typer.Option(0, help="seed of the planet draw"),
    dtype: str = typer.Option("float32", help="float32 or float64"),
    planets: Path = typer.Option(
        None,
        "--planets",
        help="exoplanet catalog (CSV/Parquet, e.g. from 'sapwood fetch "
        "nasa-exoplanets') to draw the planets from; see sapwood.data.sources.planets",
    ),
    spinup_days: float = typer.Option(
        None,
        "--spinup-days",
        help="days integrated before the first output (default: relaxed, ~24 d for Earth)",
    ),
) -> None:
    """Simulate an ensemble of planets and write CF NetCDF datacubes (see sapwood.data.simulate)."""
    from sapwood.data.simulate import Grid, simulate_ensemble

    grid = Grid(levels=levels, nlat=nlat, nlon=nlon, times=times, dt_hours=dt_hours, spinup_days=spinup_days)
    drawn = None
    if planets is not None:
        from sapwood.data.sources.planets import draw_planets, planet_params, write_provenance

        catalog_planets = draw_planets(planets, runs, seed)
        drawn = planet_params(catalog_planets)
    paths = simulate_ensemble(out, runs=runs, grid=grid, seed=seed, dtype=dtype, planets=drawn,
                              progress=console.is_terminal)  # a bar only on a terminal (no stray blank line)
    if planets is not None:
        write_provenance(catalog_planets, out / "planets.csv")
    size = sum(p.stat().st_size for p in paths)
    console.print(f"wrote {len(paths)} runs, {size / 1e6:.1f} MB, to {out}")


@app.command()
def prepare(
    inputs: list[str] = typer.Argument(
        ...,
        help="NetCDF files, Zarr stores, or folders of them; Zarr stores on "
        "S3 as s3://BUCKET/KEY (credentials from the environment)",
    ),
    out: Path = typer.Option(..., "--out", help="store folder to write"),
    variables: str = typer.Option(
        None,
        help="comma-separated variable names or CF standard names (default: every "
        "data variable on the grid; the summary lists what was left out and why)",
    ),
    force: bool = typer.Option(False, help="rebuild even if the store is up to date"),
    layout: str = typer.Option(
        "raw",
        "--format",
        help="raw (one float32 frames file, fastest) or zarr (a Zarr v3 group that xarray.open_zarr reads)",
    ),
) -> None:
    """Read CF-convention NetCDF/Zarr datacubes into a store for the loader (bad inputs are reported and
    skipped)."""
    from sapwood.data.cubes import prepare as prepare_store

    chosen = tuple(v.strip() for v in variables.split(",") if v.strip()) if variables else None
    report = prepare_store(inputs, out, chosen, force=force, layout=layout, progress=console.is_terminal)
    console.print(report.summary(), highlight=False)


@app.command()
def tokenize(
    corpus: list[Path] = typer.Argument(
        None, help="text files or folders; default: the Python stdlib .py files"
    ),
    out: Path = typer.Option(..., "--out", help="folder for tokenizer.json, meta.json and token shards"),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="BPE vocabulary size (>= 257)"),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="share of documents for validation"),
    max_files: int = typer.Option(
        300, "--max-files", help="stdlib files used when no CORPUS is given (0 = all)"
    ),
) -> None:
    """Train a byte-level BPE tokenizer and pack the corpus into memory-mapped token shards."""
    from sapwood.data.text import collect_files, stdlib_corpus, tokenize_corpus

    files = collect_files(corpus) if corpus else stdlib_corpus(max_files or None)
    meta = tokenize_corpus(files, out, vocab_size=vocab_size, val_fraction=val_fraction)
    console.print(
        f"wrote {out}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens "
        f"({meta['train_documents']} docs), val {meta['val_tokens']:,} tokens ({meta['val_documents']} "
        f"docs), "
        f"val unigram entropy {meta['val_unigram_entropy']:.3f} nats/token"
    )


@app.command()
def train(
    config: str = typer.Argument(..., help="training YAML (model or preset:, train:, data:)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint"),
) -> None:
    """Train a model from a YAML config; checkpoints, metrics.jsonl, loss.png and final/ go to train.out_dir.

    Ctrl-C stops after the current step and its checkpoint (a second one at once, never inside a checkpoint
    read or write), prints where to continue from and exits 130."""
    import math

    from sapwood.train.interrupt import TrainingInterrupted, stop_on_ctrl_c

    try:
        with stop_on_ctrl_c():  # before the heavy imports: a Ctrl-C during them is a stop request too
            from sapwood.config import load_config
            from sapwood.train.loop import train as run_training
            from sapwood.train.mesh import shutdown_distributed

            summary = run_training(load_config(config), resume=resume)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        stopped = exc if isinstance(exc, TrainingInterrupted) else TrainingInterrupted(None, None, None)
        shutdown = getattr(sys.modules.get("sapwood.train.mesh"), "shutdown_distributed", None)
        if shutdown is not None:  # imported (a Ctrl-C during the imports leaves nothing to shut down)
            shutdown()
        hint = f"sapwood train {config}" + (" --resume" if stopped.checkpoint or resume else "")
        print(f"{stopped}; to continue: {hint}", file=sys.stderr)
        raise SystemExit(130) from None
    shutdown_distributed()  # under torchrun: process groups go now, not at interpreter exit
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in summary.items()
             if v is not None and not (isinstance(v, float) and not math.isfinite(v))}
    console.print(" ".join(f"{k}={v}" for k, v in shown.items()), soft_wrap=True)


@app.command()
def size(
    config: str = typer.Argument(..., help="preset name, YAML file or checkpoint folder"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    precision: str = typer.Option(
        None, help="fp32, bf16, fp16 or bf16-pure (default: train.precision, else bf16)"
    ),
    optimizer: str = typer.Option("adamw", help="adamw, adamw8bit or sgd"),
    checkpointing: str = typer.Option(
        None,
        help="activation checkpointing as in the YAML: none, every_layer or "
        "every_k (counted as every_layer); also selective (attention core only)",
    ),
    seq: int = typer.Option(None, help="tokens per sequence (default: model.trained_context)"),
    micro_batch: int = typer.Option(
        None, help="sequences per micro-batch (default: train.micro_batch_size, else 1)"
    ),
    optimizer_in_backward: bool = typer.Option(
        None,
        "--optimizer-in-backward/--no-optimizer-in-backward",
        help="optimizer step fused into backward (default: train section)",
    ),
    loss_chunk: int = typer.Option(
        None, "--loss-chunk", help="tokens per chunk of the loss (default: train section)"
    ),
    measure: bool = typer.Option(
        False,
        "--measure",
        help="also run one training step on fake tensors under torch's "
        "memory tracker and print the measured peak next to the prediction",
    ),
    device_gb: float = typer.Option(
        80.0,
        "--device-gb",
        help="memory of one serving device in GB, for the KV "
        "plan (longest context per device under the preset's TP x PP split)",
    ),
) -> None:
    """Parameters, training memory per GPU and FLOPs per token, without allocating weights."""
    import json

    from sapwood.config import load_config
    from sapwood.sizing import print_size_report, size_report

    loaded = load_config(config)
    report = size_report(loaded, precision, optimizer, checkpointing, seq, micro_batch, optimizer_in_backward,
                         loss_chunk, device_gb=device_gb)
    if measure and "memory_per_gpu" in report:
        from sapwood.sizing.measure import measure_training_step

        mem = report["memory_per_gpu"]
        report["measured"] = measure_training_step(
            loaded, mem["precision"], mem["optimizer"], mem["checkpointing"], mem["seq"], mem["micro_batch"],
            mem["optimizer_in_backward"], mem["loss_chunk"]).as_dict()
    if as_json:
        print(json.dumps(report))
    else:
        print_size_report(report, console)


@app.command()
def solve(
    params: float = typer.Option(..., "--params", help="target parameter count, e.g. 13.14e9"),
    layers: int = typer.Option(None, help="fixed number of layers"),
    heads: int = typer.Option(None, help="fixed number of attention heads"),
    kv_heads: int = typer.Option(None, "--kv-heads", help="fixed kv heads (default: = heads)"),
    hidden: int = typer.Option(None, help="fixed hidden size"),
    ffn: int = typer.Option(None, help="fixed FFN size (a multiple of 64)"),
    head_dim: int = typer.Option(None, "--head-dim", help="fixed head_dim (a multiple of 8)"),
    vocab: int = typer.Option(32000, help="vocabulary size"),
    tied: bool = typer.Option(False, "--tied", help="tie the head to the embedding"),
    tolerance: float = typer.Option(5e-4, help="largest relative distance from --params accepted"),
    ffn_ratio: float = typer.Option(
        8 / 3, "--ffn-ratio", help="preferred ffn / hidden among matching shapes"
    ),
    near_hidden: int = typer.Option(None, "--near-hidden", help="preferred hidden among matching shapes"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    family: str = typer.Option(
        "llama", help="HF family whose options are counted: llama, mistral, qwen2, qwen3, phi3"
    ),
) -> None:
    """The valid config (head_dim a multiple of 8, ffn a multiple of 64) nearest to --params.

    Prints YAML (a model: section, headlines as comments): `sapwood solve ... > model.yaml`.
    """
    import json

    import yaml

    from sapwood.config import FAMILY_OPTIONS
    from sapwood.sizing import SolveRequest
    from sapwood.sizing import solve as solve_config

    result = solve_config(SolveRequest(params, layers, heads, kv_heads, hidden, ffn, head_dim, vocab, tied,
                                       tolerance, ffn_ratio, near_hidden, family=family))
    model = result.model.model_dump(
        include={
            "vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "tied_embeddings",
            *FAMILY_OPTIONS[family],
        }
    )
    if as_json:
        print(json.dumps({"params_total": result.params, "relative_error": result.error, "model": model}))
        return
    lines = [f"# {result.params:,} parameters ({result.error:+.2e} relative to {params:g})"]
    lines += [f"# also within tolerance: {total:,} layers={alt.layers} hidden={alt.hidden} heads={alt.heads} "
              f"kv_heads={alt.kv_heads} ffn={alt.ffn}" for total, alt in result.alternatives]
    print("\n".join(lines))  # YAML comments, so stdout stays one YAML document for a pipe
    print(yaml.safe_dump({"model": model}, sort_keys=False).rstrip())


def _show_bench(results: list, path: Path | None = None) -> None:
    """Print a bench suite's results table, then where its JSON was written (when the suite says)."""
    from sapwood.bench.harness import print_results

    print_results(results)
    if path is not None:
        console.print(f"wrote {path}")


@bench_app.command("model")
def bench_model(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for model.json and model.png"),
    preset: str = typer.Option("tiny", help="model shape (preset or YAML)"),
    batch: int = typer.Option(4, help="sequences per step"),
    seq: int = typer.Option(128, help="tokens per sequence"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    repeats: int = typer.Option(5, help="timed steps per implementation"),
    threads: int = typer.Option(None, help="CPU intra-op threads (default: torch's choice)"),
) -> None:
    """Forward+backward tokens/s of the sapwood Decoder vs a plain reference of the same math."""
    from sapwood.bench.model import run_model_bench

    _show_bench(*run_model_bench(out, preset, batch, seq, dtype, device, repeats, threads))


@app.command()
def generate(
    folder: Path = typer.Argument(
        ..., help="checkpoint folder (config.yaml, model.safetensors, tokenizer.json)"
    ),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens to generate (at most)"),
    temperature: float = typer.Option(0.8, help="0..2; 0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="keep the k most likely tokens (0 = off)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus mass in (0, 1]"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats"),
    seed: int = typer.Option(None, help="seed for reproducible sampling"),
    greedy: bool = typer.Option(False, "--greedy", help="argmax decoding (ignores temperature/top-k/top-p)"),
    samples: int = typer.Option(1, help="independent samples, generated as one batch"),
    stop: list[str] = typer.Option(None, "--stop", help="stop string (repeatable, at most 4)"),
) -> None:
    """Continue --prompt with the model in FOLDER (batched through the inference engine)."""
    from sapwood.infer.generate import generate_samples
    from sapwood.infer.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, greedy=greedy, stop=list(stop or []),
    )
    for i, text in enumerate(generate_samples(folder, prompt, params, samples)):
        if samples > 1:
            console.rule(f"sample {i + 1}")
        print(prompt + text)


@app.command(
    epilog="Endpoints: POST /v1/completions (logprobs, echo), POST /v1/chat/completions (stream: true "
    "for server-sent events), GET /v1/models, POST /v1/predict (datacube surrogates: JSON, .npy or "
    "NetCDF), GET /health, GET /metrics (Prometheus), GET /docs and /openapi.json (the API "
    "schema). API keys: SAPWOOD_API_KEYS=key1,key2 in the environment (then /v1/*, /docs and "
    "/openapi.json need 'Authorization: Bearer KEY'); without keys the server binds loopback only. "
    "The model name in requests is optional; it defaults to the folder's name, or the run's "
    "folder for RUN/final and RUN/checkpoints/step_N. Exit status 3: the engine failed "
    "repeatedly (restart the process)."
)
def serve(
    folder: Path = typer.Argument(..., help="checkpoint folder to serve"),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback only unless SAPWOOD_API_KEYS is set)"),
    port: int = typer.Option(8000, help="TCP port"),
    model_name: str = typer.Option(
        None, "--model-name", help="name in /v1/models (default: the folder name, or RUN for RUN/final)"
    ),
    max_batch: int = typer.Option(64, "--max-batch", help="requests decoded together"),
    max_queue: int = typer.Option(256, "--max-queue", help="waiting requests before 429"),
    request_timeout: float = typer.Option(
        300.0, "--request-timeout", help="seconds before a request gets 504"
    ),
    kv_memory_gb: float = typer.Option(
        None, "--kv-memory-gb", help="KV-cache budget in GB (default: half the memory free after loading)"
    ),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    lora: list[str] = typer.Option(
        None,
        "--lora",
        help="NAME=ADAPTER_DIR: serve a LoRA adapter (PEFT folder) on "
        "this base as model NAME (repeatable; batches mix adapters)",
    ),
    context_overflow: str = typer.Option(
        "refuse",
        "--context-overflow",
        help="refuse: a request past the model's maximum context gets 400 (413 "
        "past the KV budget); window: it is served through attention sinks + a "
        "sliding window (StreamingLLM), sinks + window positions per request",
    ),
    sinks: int = typer.Option(4, "--sinks", help="attention-sink tokens kept (--context-overflow window)"),
    window: int = typer.Option(
        None, "--window", help="recent tokens kept (--context-overflow window; default: max_context - sinks)"
    ),
    window_requests: int = typer.Option(
        4, "--window-requests", help="windowed requests at once before 429 (--context-overflow window)"
    ),
) -> None:
    """OpenAI-compatible HTTP server (completions, chat, streaming, /health, /metrics; /v1/predict for
    cubes)."""
    from sapwood.config import validate
    from sapwood.serve.server import run_server
    from sapwood.serve.settings import ServeSettings

    settings = validate(ServeSettings, dict(host=host, port=port, model_name=model_name, max_batch=max_batch,
                                            max_queue=max_queue, request_timeout_s=request_timeout,
                                            kv_memory_gb=kv_memory_gb, lora_adapters=lora_pairs(lora or []),
                                            context_overflow=context_overflow, sinks=sinks, window=window,
                                            window_requests=window_requests),
                        "serve: ")
    run_server(folder, settings, device=device)


@bench_app.command("serve")
def bench_serve(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for serve.json and serve.png"),
    concurrency: str = typer.Option("1,4,16,64", help="comma-separated concurrent request counts"),
    max_tokens: int = typer.Option(32, "--max-tokens", help="new tokens per request"),
    requests_per_level: int = typer.Option(
        0, "--requests", help="requests per level (default: max(concurrency, 4))"
    ),
    preset: str = typer.Option("tiny", help="model shape (preset or YAML) for the random-weight model"),
    folder: Path = typer.Option(None, "--folder", help="serve this checkpoint instead of a random one"),
    repeats: int = typer.Option(3, "--repeats", help="runs of each level (medians; ratio spread in params)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda: where the server and the baseline run"),
) -> None:
    """sapwood serve (HTTP, continuous batching) vs transformers generate on the same exported weights, plus a
    mixed-length row and a load row (TTFT / inter-token latency p50, p99) at the largest concurrency."""
    from sapwood.bench.serve import run_serve_bench

    levels = [int(c) for c in concurrency.split(",") if c.strip()]
    _show_bench(
        *run_serve_bench(out, levels, max_tokens, requests_per_level, preset, folder, repeats, device)
    )


@bench_app.command("gpu")
def bench_gpu(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for gpu.json and gpu.png"),
    smoke: bool = typer.Option(
        False, "--smoke", help="tiny shapes on the CPU: the same code path, no GPU needed"
    ),
    models: str = typer.Option(
        "", "--models", help="comma-separated subset of astro-13b,research-799m,llama3-8b-shape"
    ),
    budget_s: float = typer.Option(
        420.0, "--budget-s", help="start no further model after this many seconds"
    ),
) -> None:
    """The prepared device check: astro-13b training steps under the memory plan (peak memory, fragmentation,
    forward / backward s per batch, tokens/s), MFU of research-799m and a Llama-3-8B shape, the attention
    kernel."""
    from sapwood.bench.gpu import run_gpu_bench

    chosen = [m.strip() for m in models.split(",") if m.strip()] or None
    _show_bench(*run_gpu_bench(out, smoke=smoke, models=chosen, budget_s=budget_s))


@bench_app.command("context")
def bench_context(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for context.json and context.png"),
    trained_context: int = typer.Option(64, "--trained-context", help="context the tiny model trains at"),
    steps: int = typer.Option(300, help="training steps"),
    multiples: str = typer.Option("2,4,8", help="evaluation lengths as multiples of the trained context"),
) -> None:
    """Perplexity past the trained context: each RoPE scaling vs none, on a tiny model trained here."""
    from sapwood.bench.context import run_context_bench

    factors = [int(m) for m in multiples.split(",") if m.strip()]
    _show_bench(*run_context_bench(out, trained_context, steps, factors))


@bench_app.command("window")
def bench_window(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for window.json and window.png"),
    trained_context: int = typer.Option(64, "--trained-context", help="context the tiny model trains at"),
    steps: int = typer.Option(300, help="training steps"),
    multiples: str = typer.Option("1,4", help="evaluation lengths as multiples of the trained context"),
    window_sizes: str = typer.Option(
        "", "--windows", help="sliding-window sizes (default: trained/4, trained/2)"
    ),
    sinks: int = typer.Option(4, help="attention-sink tokens kept at the start"),
) -> None:
    """Perplexity streaming with attention sinks + a sliding window (bounded memory) vs full attention."""
    from sapwood.bench.context import run_window_bench

    factors = [int(m) for m in multiples.split(",") if m.strip()]
    sizes = [int(w) for w in window_sizes.split(",") if w.strip()] or None
    _show_bench(*run_window_bench(out, trained_context, steps, factors, sizes, sinks))


@bench_app.command("passkey")
def bench_passkey(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for passkey.json and passkey.png"),
    trained_context: int = typer.Option(32, "--trained-context", help="context the tiny model trains at"),
    steps: int = typer.Option(1000, help="training steps of the base model"),
    finetune_steps: int = typer.Option(
        100, "--finetune-steps", help="steps of the YaRN context-extension fine-tune"
    ),
    multiples: str = typer.Option("1,4,8,16", help="evaluation lengths as multiples of the trained context"),
    samples: int = typer.Option(64, help="passkeys per length (depths evenly spread)"),
) -> None:
    """Passkey retrieval past the trained length: each RoPE scaling, and YaRN after a short fine-tune."""
    from sapwood.bench.passkey import run_passkey_bench

    factors = [int(m) for m in multiples.split(",") if m.strip()]
    _show_bench(*run_passkey_bench(out, trained_context, steps, finetune_steps, factors, samples))


@app.command("eval-context")
def eval_context(
    folder: Path = typer.Argument(..., help="checkpoint folder of a model trained on the passkey task"),
    multiples: str = typer.Option("1,4,8,16", help="lengths as multiples of the model's trained_context"),
    methods: str = typer.Option("model,none,linear,ntk,yarn,yarn_by_length", help="RoPE scalings to apply "
                                "(model = the checkpoint's own; METHOD_by_length = rope_policy by_length)"),
    factor: float = typer.Option(None, help="scaling factor (default: the largest multiple)"),
    samples: int = typer.Option(64, help="passkeys per length (depths evenly spread)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Passkey retrieval accuracy of a checkpoint at multiples of its trained context, per RoPE scaling."""
    import json

    from rich.table import Table

    from sapwood.bench.passkey import passkey_table
    from sapwood.config import load_config

    lengths = [int(m) for m in multiples.split(",") if m.strip()]
    if not lengths or min(lengths) < 1:
        raise SapwoodError(f"--multiples {multiples!r}: give integers >= 1, e.g. 1,4,8,16")
    trained = load_config(folder).model.trained_context
    table = passkey_table(folder, trained, lengths, [m.strip() for m in methods.split(",") if m.strip()],
                          factor or float(max(lengths)), samples)
    if as_json:
        print(json.dumps({"trained_context": trained, "accuracy": table}))
        return
    view = Table(
        "method", *[f"{m}x ({m * trained} tokens)" for m in lengths], title=f"passkey accuracy: {folder}"
    )
    for method, row in table.items():
        view.add_row(method, *[f"{row[m]:.2f}" for m in lengths])
    console.print(view)


@app.command()
def grow(
    folder: Path = typer.Argument(..., help="checkpoint folder to grow"),
    out: Path = typer.Option(..., "--out", help="folder for the grown checkpoint"),
    to: Path | None = typer.Option(
        None, "--to", help="grow towards this model shape: preset, config, or only the changed fields"
    ),
    layers: int | None = typer.Option(None, "--layers", help="total blocks after growth"),
    hidden: int | None = typer.Option(None, "--hidden", help="residual width after growth"),
    ffn: int | None = typer.Option(None, "--ffn", help="SwiGLU units per block after growth"),
    heads: int | None = typer.Option(None, "--heads", help="query heads after growth"),
    kv_heads: int | None = typer.Option(None, "--kv-heads", help="kv heads after growth"),
    position: str = typer.Option("evenly", "--position", help="where new blocks go: end, middle, evenly"),
    depth_init: str = typer.Option("identity", "--depth-init", help="new blocks: identity or stack (copies)"),
    random_init: bool = typer.Option(
        False, "--random-init", help="random new parts (NOT function-preserving)"
    ),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="replace --out when it already holds files"),
) -> None:
    """Grow a checkpoint (function-preserving) by per-operator sizes or towards --to CONFIG.

    --to takes a preset, a config with a model: section, or a YAML of only the fields that change
    (e.g. `layers: 8`); unchanged fields come from FOLDER.
    """
    from sapwood.grow.folder import grow_folder
    from sapwood.grow.plan import GrowthRequest

    refuse_existing_out(out, force)
    sizes = {"layers": layers, "hidden": hidden, "ffn": ffn, "heads": heads, "kv_heads": kv_heads}
    request = GrowthRequest(**sizes, layer_position=position, depth_init=depth_init,
                            function_preserving=not random_init)
    if to is None and all(v is None for v in sizes.values()):
        request = None
    report = grow_folder(folder, out, request, to=to, seed=seed)
    console.print(f"{report['shape_before']} -> {report['shape_after']}")
    console.print(f"params {report['params_before']:,} -> {report['params_after']:,}; "
                  f"max |logit change| on random tokens {report['max_abs_logit_diff']:.3g}; wrote {out}")


@bench_app.command("grow")
def bench_grow(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for grow.json and grow.png"),
    steps: int = typer.Option(100, "--steps", help="optimizer steps of the from-scratch baseline"),
    target_loss: float | None = typer.Option(
        None, "--target-loss", help="validation loss to reach (default: auto)"
    ),
    scale: float = typer.Option(1.0, "--scale", help="multiply model widths (1 = tiny CPU default)"),
    grow_fraction: float = typer.Option(0.3, "--grow-fraction", help="share of the steps trained small"),
    seed: int = typer.Option(0, "--seed", help="first seed"),
    seeds: int = typer.Option(3, "--seeds", help="seeds to run (mean and spread are reported)"),
    methods: str | None = typer.Option(
        None, "--methods", help="comma-separated growth methods (default: all)"
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="keep the tokenized corpus here (reused)"),
    rewarm_steps: int = typer.Option(0, "--rewarm-steps", help="LR re-warm-up steps after growth (0 = none)"),
    mask_ramp_steps: int | None = typer.Option(
        None, "--mask-ramp-steps", help="mask ramp (default: steps/10)"
    ),
    eval_every: int | None = typer.Option(
        None, "--eval-every", help="steps between evaluations (default: steps/50)"
    ),
    budget_s: float | None = typer.Option(
        None, "--budget-s", help="start no seed that would end past this many seconds"
    ),
) -> None:
    """Compute to reach a target loss: large model from scratch vs small model grown into it."""
    from sapwood.bench.grow import run_grow_bench

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    run_grow_bench(
        out, steps=steps, target_loss=target_loss, scale=scale, seed=seed, grow_fraction=grow_fraction,
        seeds=seeds, methods=chosen, data_dir=data_dir, rewarm_steps=rewarm_steps,
        mask_ramp_steps=mask_ramp_steps, eval_every=eval_every, budget_s=budget_s,
    )


@bench_app.command("grow-budget")
def bench_grow_budget(
    out: Path = typer.Option(
        Path("bench-out"), "--out", help="folder for grow-budget.json and grow-budget.png"
    ),
    steps: int = typer.Option(300, "--steps", help="optimizer steps of each run"),
    seed: int = typer.Option(0, "--seed", help="first seed"),
    seeds: int = typer.Option(3, "--seeds", help="seeds to run (mean and spread are reported)"),
    method: str = typer.Option("masked", "--method", help="growth.method: zero or masked"),
    rewarm_steps: int = typer.Option(0, "--rewarm-steps", help="LR re-warm-up steps after each event"),
    scale: float = typer.Option(1.0, "--scale", help="multiply model widths (1 = tiny CPU default)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="keep the tokenized corpus here (reused)"),
    plateau_window: int = typer.Option(15, "--plateau-window", help="plateau trigger window (steps)"),
    min_rel_improvement: float = typer.Option(
        0.02, "--min-rel-improvement", help="grow when a window improves on the previous by less"
    ),
) -> None:
    """Grow on loss plateaus until the memory budget (that of L), against L's shape trained from scratch."""
    from sapwood.bench.grow import run_budget_bench

    run_budget_bench(out, steps=steps, seeds=seeds, seed=seed, data_dir=data_dir, method=method,
                     rewarm_steps=rewarm_steps, scale=scale, plateau_window=plateau_window,
                     min_rel_improvement=min_rel_improvement)


@bench_app.command("train")
def bench_train(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for train.json and train.png"),
    preset: str = typer.Option("tiny", help="model shape (preset or YAML)"),
    seq: int = typer.Option(128, help="tokens per sequence"),
    micro_batch: int = typer.Option(8, "--micro-batch", help="sequences per step"),
    steps: int = typer.Option(6, help="timed steps per variant"),
    warmup: int = typer.Option(1, help="untimed steps per variant"),
    threads: int = typer.Option(2, help="CPU threads per variant"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    tokens: Path = typer.Option(
        None, "--tokens", help="token folder from `sapwood tokenize` (default: stdlib subset)"
    ),
    compile_: bool = typer.Option(
        False, "--compile/--no-compile", help="also measure torch.compile (slow to compile on CPU)"
    ),
) -> None:
    """sapwood training loop (fp32/bf16, +-activation checkpointing, +-compile) vs a nanoGPT-style loop."""
    from sapwood.bench.train import TrainBenchSettings, run_train_bench

    settings = TrainBenchSettings(preset=preset, seq_len=seq, micro_batch_size=micro_batch, steps=steps,
                                  warmup_steps=warmup, threads=threads, device=device,
                                  tokens_dir=str(tokens) if tokens else None)
    run_train_bench(settings, out, compile_variants=compile_)


@bench_app.command("data")
def bench_data(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for data.json and data.png"),
    batch_gb: float = typer.Option(
        0.05, "--batch-gb", help="bytes per batch in GB (1.88 is the design target)"
    ),
    levels: int = typer.Option(8, help="sigma layers of the simulated cubes"),
    nlat: int = typer.Option(32, help="latitudes (use 64+ for GB batches)"),
    nlon: int = typer.Option(64, help="longitudes"),
    batches: int = typer.Option(4, help="timed batches"),
    work: Path = typer.Option(None, "--work", help="where simulated data and the store live (reused)"),
    zarr: bool = typer.Option(True, "--zarr/--no-zarr", help="also time the Zarr v3 layout of the same data"),
    train_steps: int = typer.Option(
        60, "--train-steps", help="steps of the cube training runs whose data wait is measured (0: none)"
    ),
) -> None:
    """Seconds per cube batch: sapwood loader vs naive xarray loading vs a raw read of the same bytes, and
    the data-wait fraction of a short cube training run."""
    from sapwood.bench.data import run_data_bench

    _show_bench(
        run_data_bench(out, work, batch_gb, levels, nlat, nlon, batches, zarr=zarr, train_steps=train_steps)
    )


@bench_app.command("augment")
def bench_augment(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for augment.json and augment.png"),
    batch_gb: float = typer.Option(
        0.05, "--batch-gb", help="bytes per batch in GB (1.88 is the design target)"
    ),
    levels: int = typer.Option(8, help="sigma layers"),
    nlat: int = typer.Option(32, help="latitudes"),
    nlon: int = typer.Option(64, help="longitudes"),
    repeats: int = typer.Option(5, help="timed calls per implementation"),
) -> None:
    """Batched physics-aware augmentation vs a per-sample, per-variable numpy loop (CPU; GPU when present)."""
    from sapwood.bench.augment import run_augment_bench

    _show_bench(run_augment_bench(out, batch_gb, levels, nlat, nlon, repeats))


@app.command("eval")
def eval_surrogate(
    folder: Path = typer.Argument(..., help="surrogate checkpoint folder"),
    data: Path = typer.Option(..., "--data", help="cube store (sapwood prepare)"),
    out: Path = typer.Option(None, "--out", help="folder for eval.json and PNGs (default DIR/eval)"),
    rollout: int = typer.Option(20, "--rollout", help="autoregressive rollout steps"),
    runs: str = typer.Option(
        None, "--runs", help="comma-separated held-out run indices (default: all held out)"
    ),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    holdout_time: float = typer.Option(
        None,
        "--holdout-time",
        help="score the final fraction F of every training run (at most the model's cube.holdout_time)",
    ),
) -> None:
    """Skill (WB2 RMSE, ACC vs persistence/climatology/advective persistence), physics and rollout of a
    surrogate."""
    from sapwood.evaluate import evaluate_surrogate, print_summary

    chosen = [int(r) for r in runs.split(",")] if runs else None
    result = evaluate_surrogate(folder, data, out or folder / "eval", rollout, chosen, device,
                                holdout_time=holdout_time)
    print_summary(result)


@bench_app.command("physics")
def bench_physics(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for physics.json and physics.png"),
    batch: int = typer.Option(64, help="states per batch for the speed comparison"),
    levels: int = typer.Option(8, help="sigma layers"), nlat: int = typer.Option(32, help="latitudes"),
    nlon: int = typer.Option(64, help="longitudes"),
    train_steps: int = typer.Option(300, "--train-steps", help="steps of each of the two trained surrogates"),
    runs: int = typer.Option(24, help="simulated planets for the trained surrogates"),
    skip_training: bool = typer.Option(False, "--skip-training", help="only the speed comparison"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    repeats: int = typer.Option(21, help="paired timing repeats (the ratio's spread is reported)"),
) -> None:
    """Unified physics module vs naive separate constraint loops; violations without/with physics
    loss/projection."""
    from sapwood.bench.physics import run_physics_bench

    run_physics_bench(out, batch, levels, nlat, nlon, train_steps, runs, skip_training, device, repeats)


@bench_app.command("predict")
def bench_predict(
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for predict.json and predict.png"),
    source: str = typer.Option("cube-small", "--model", help="surrogate checkpoint folder or cube preset"),
    repeats: int = typer.Option(300, help="timed predictions per path"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model as well"),
) -> None:
    """p50/p99 latency of one batch-of-one surrogate prediction (preallocated, CUDA graph on GPU) vs eager."""
    from sapwood.bench.predict import run_predict_bench

    run_predict_bench(out, source, repeats, device, compile_)


@app.command()
def consolidate(
    checkpoint: Path = typer.Argument(
        ..., help="training checkpoint folder (OUT/checkpoints/step_N), any world size"
    ),
    out: Path = typer.Option(
        ..., "--out", help="checkpoint folder to write (config.yaml + model.safetensors)"
    ),
) -> None:
    """Merge a sharded (torch.distributed.checkpoint) training checkpoint into a normal checkpoint folder."""
    from sapwood.train.consolidate import consolidate as run_consolidate

    console.print(f"wrote {run_consolidate(checkpoint, out)}")


@app.command()
def fetch(
    sources: list[str] = typer.Argument(None, help="source names from the catalog (see --list)"),
    out: Path = typer.Option(
        None, "--out", help="folder to fetch into (prepare's / tokenize's input folder)"
    ),
    catalog: list[Path] = typer.Option(
        None,
        "--catalog",
        help="your own source catalog YAML (repeatable; "
        "also SAPWOOD_SOURCES); entries add to or override the packaged ones",
    ),
    request: Path = typer.Option(
        None,
        "--request",
        help="YAML mapping of source fields to override, e.g. "
        "dataset:/request: for CDS, query: for TAP, term: for NCBI",
    ),
    set_fields: list[str] = typer.Option(None, "--set", help="FIELD=VALUE (YAML value) overriding one field"),
    refresh: bool = typer.Option(False, "--refresh", help="ignore the request cache in OUT/.sapwood-fetch"),
    list_sources: bool = typer.Option(False, "--list", help="list the catalog's sources and exit"),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="log every request (credentials are redacted)"
    ),
) -> None:
    """Fetch from archives (TAP, MAST, CDS, NCBI, S3) into OUT; credentials come from the environment only."""
    from sapwood.data.sources.command import fetch_command

    fetch_command(
        sources or [], out, catalog or [], request, set_fields or [], refresh, list_sources, console, verbose
    )


@bench_app.command("list")
def bench_list() -> None:
    """The benchmark suites, one a line: name and what it measures."""
    import click

    group = typer.main.get_command(bench_app)
    context = click.Context(group)
    for name in group.list_commands(context):
        if name != "list":
            console.print(f"{name:10} {group.get_command(context, name).get_short_help_str(100)}",
                          markup=False, highlight=False)


@app.command()
def finetune(
    config: str = typer.Argument(..., help="fine-tuning YAML (sft: {base, data, lora?}, train:)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint"),
) -> None:
    """Supervised fine-tuning of a checkpoint on chat / instruction JSONL (full or LoRA); final/ in
    train.out_dir."""
    import math

    from sapwood.train.loop import TrainingInterrupted
    from sapwood.train.loop import train as run_training
    from sapwood.train.mesh import shutdown_distributed
    from sapwood.train.sft import finetune_config

    try:
        summary = run_training(finetune_config(config), resume=resume)
    except TrainingInterrupted as exc:
        shutdown_distributed()
        print(f"{exc}; to continue: sapwood finetune {config} --resume", file=sys.stderr)
        raise SystemExit(130) from None
    shutdown_distributed()
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in summary.items()
             if v is not None and not (isinstance(v, float) and not math.isfinite(v))}
    console.print(" ".join(f"{k}={v}" for k, v in shown.items()), soft_wrap=True)


@app.command("merge-lora")
def merge_lora(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder (a LoRA run's final/)"),
    out: Path = typer.Option(..., "--out", help="checkpoint folder to write"),
    base: Path = typer.Option(
        None, "--base", help="base checkpoint (default: the adapter's base_model_name_or_path)"
    ),
    force: bool = typer.Option(False, "--force", help="replace --out when it already holds files"),
) -> None:
    """Merge a LoRA adapter into its base: a normal checkpoint folder (W + alpha/r * B A)."""
    from sapwood.train.sft import merge_lora_folder

    refuse_existing_out(out, force)
    merged = merge_lora_folder(adapter, out, base)
    console.print(f"wrote {merged}")


def lora_pairs(values: list[str]) -> dict[str, str]:
    """``NAME=DIR`` options as a mapping; one-line error for a malformed or repeated one."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise SapwoodError(f"--lora {value!r}: expected NAME=ADAPTER_DIR")
        if name in pairs:
            raise SapwoodError(f"--lora {name}=...: the name is given twice")
        pairs[name.strip()] = folder.strip()
    return pairs


def refuse_existing_out(out: Path, force: bool) -> None:
    """An existing non-empty ``--out`` is replaced only with ``--force``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SapwoodError(f"--out {out} already exists and is not empty; pass --force to replace it "
                           "or choose another folder")


@app.callback()
def _global_options(
    verbose: bool = typer.Option(False, "--verbose", help="also show third-party warnings (torch, ...)"),
) -> None:
    quiet_warnings(verbose)
    end_start_up()


# --- commands are added above this line, one per concept, each delegating to its module ---


def quiet_warnings(verbose: bool) -> None:
    """Hide third-party UserWarning/FutureWarning/DeprecationWarning and the warning-level log lines of torch
    and torchao unless ``--verbose`` (or python -W; ``TORCH_LOGS`` set by the user wins for torch's logs);
    sapwood's own warnings (:class:`sapwood.errors.SapwoodWarning`) stay visible."""
    import logging
    import os
    import warnings

    from sapwood.errors import SapwoodWarning

    if verbose or sys.warnoptions or os.environ.get("RANK", "0") != "0":
        return
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=SapwoodWarning)
    os.environ.setdefault("TORCH_LOGS", "-all")  # read when torch is imported: its loggers at ERROR
    logging.getLogger("torchao").setLevel(logging.ERROR)  # e.g. "Failed to load ...so" on import


def quiet_other_ranks() -> None:
    """Under torchrun only rank 0 writes console output; the other ranks still report errors on stderr."""
    import os

    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        import warnings

        warnings.simplefilter("ignore")


def end_start_up() -> None:
    """The command is about to run: Ctrl-C is Python's again (a command may take it over)."""
    if signal.getsignal(signal.SIGINT) is _ctrl_c_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    quiet_other_ranks()
    try:
        app(args=argv, standalone_mode=True)
    except SapwoodError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
