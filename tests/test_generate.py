"""`sapwood generate`: greedy output equals the engine's, seeds reproduce, bad values exit 2 with one line."""

from __future__ import annotations

import subprocess
import sys

from sapwood.infer import Engine, SamplingParams


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sapwood.cli", "generate", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_greedy_seeded_and_errors(lm_folder):
    engine = Engine.from_folder(lm_folder)
    expected = engine.generate_text(["def f(x):"], SamplingParams(max_tokens=12, temperature=0))[0]
    greedy = run_cli(str(lm_folder), "--prompt", "def f(x):", "--max-new-tokens", "12", "--greedy")
    assert greedy.returncode == 0, greedy.stderr
    assert greedy.stdout == "def f(x):" + expected + "\n"
    args = [
        str(lm_folder), "--prompt", "import", "--max-new-tokens", "10", "--temperature", "0.9", "--top-k",
        "50", "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "7",
    ]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0 and first.stdout == second.stdout
    bad = run_cli(str(lm_folder), "--prompt", "x", "--temperature", "3")
    assert bad.returncode == 2 and "temperature=3.0: must be in [0, 2]" in bad.stderr
    assert "Traceback" not in bad.stderr
