"""The ``sapwood`` command line (typer). Each command is a thin shell over its module.

User errors (:class:`sapwood.errors.SapwoodError`) print one line and exit with code 2.
Imports of heavy modules happen inside commands so ``sapwood --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from sapwood.errors import SapwoodError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Size, build, grow, train and serve large transformers.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: ours vs a baseline in the same run (JSON + PNG).")
app.add_typer(bench_app, name="bench")
console = Console()


@app.command()
def create(preset: str, out: Path = typer.Option(..., "--out", help="checkpoint folder to write")) -> None:
    """Write an initialized checkpoint folder for PRESET (a preset name or YAML)."""
    from sapwood.config import load_config
    from sapwood.model import build_model, save_folder

    config = load_config(preset)
    model = build_model(config)
    save_folder(model, config, out)
    console.print(f"wrote {out}")


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), "--out", help="folder for everything the demo writes")) -> None:
    """Run the whole pipeline end to end on embedded defaults (CPU, minutes)."""
    from sapwood.demo import run_demo

    run_demo(out)


@app.command("import-hf")
def import_hf_command(hf_dir: Path, out: Path = typer.Option(..., "--out", help="sapwood checkpoint folder to write")) -> None:
    """Convert a Hugging Face Llama-family folder (config.json, *.safetensors, tokenizer.json)."""
    from sapwood.model.hf import import_hf

    console.print(f"wrote {import_hf(hf_dir, out)}")


@app.command("export-hf")
def export_hf_command(folder: Path, out: Path = typer.Option(..., "--out", help="Hugging Face folder to write")) -> None:
    """Write a sapwood checkpoint folder as one transformers loads with LlamaForCausalLM."""
    from sapwood.model.hf import export_hf

    console.print(f"wrote {export_hf(folder, out)}")


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="folder for the NetCDF files (run_NNNN.nc)"),
    runs: int = typer.Option(4, help="ensemble members (planets)"),
    times: int = typer.Option(24, help="output times per run"),
    levels: int = typer.Option(8, help="sigma layers"),
    nlat: int = typer.Option(32, help="latitudes"),
    nlon: int = typer.Option(64, help="longitudes"),
    dt_hours: float = typer.Option(6.0, help="hours between outputs"),
    seed: int = typer.Option(0, help="seed of the planet draw"),
    dtype: str = typer.Option("float32", help="float32 or float64"),
) -> None:
    """Simulate an ensemble of planets and write CF NetCDF datacubes (see sapwood.data.simulate)."""
    from sapwood.data.simulate import Grid, simulate_ensemble

    grid = Grid(levels=levels, nlat=nlat, nlon=nlon, times=times, dt_hours=dt_hours)
    paths = simulate_ensemble(out, runs=runs, grid=grid, seed=seed, dtype=dtype)
    size = sum(p.stat().st_size for p in paths)
    console.print(f"wrote {len(paths)} runs, {size / 1e6:.1f} MB, to {out}")


@app.command()
def tokenize(
    corpus: list[Path] = typer.Argument(None, help="text files or folders; default: the Python stdlib .py files"),
    out: Path = typer.Option(..., "--out", help="folder for tokenizer.json, meta.json and token shards"),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="BPE vocabulary size (>= 257)"),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="share of documents for validation"),
    max_files: int = typer.Option(300, "--max-files", help="stdlib files used when no CORPUS is given (0 = all)"),
) -> None:
    """Train a byte-level BPE tokenizer and pack the corpus into memory-mapped token shards."""
    from sapwood.data.text import collect_files, stdlib_corpus, tokenize_corpus

    files = collect_files(corpus) if corpus else stdlib_corpus(max_files or None)
    meta = tokenize_corpus(files, out, vocab_size=vocab_size, val_fraction=val_fraction)
    console.print(
        f"wrote {out}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} tokens "
        f"({meta['train_documents']} docs), val {meta['val_tokens']:,} tokens ({meta['val_documents']} docs), "
        f"val unigram entropy {meta['val_unigram_entropy']:.3f} nats/token"
    )


@app.command()
def train(
    config: str = typer.Argument(..., help="training YAML (model or preset:, train:, data:)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint"),
) -> None:
    """Train a model from a YAML config; checkpoints, metrics.jsonl, loss.png and final/ go to train.out_dir."""
    from sapwood.config import load_config
    from sapwood.train.loop import train as run_training

    summary = run_training(load_config(config), resume=resume)
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in summary.items()}
    console.print(" ".join(f"{k}={v}" for k, v in shown.items()))


# --- commands are added above this line, one per concept, each delegating to its module ---


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except SapwoodError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
