"""``sapwood bench serve``: the sapwood server vs ``transformers`` ``generate`` on the same weights.

Ours: ``sapwood serve`` in its own process (continuous batching), driven over HTTP by streaming
clients at concurrency 1, 4, 16, 64; time to first token is the first SSE chunk. Baselines, in the
same run, same prompts, same new-token count, on the ``export-hf`` copy of the same checkpoint:

* ``hf one-at-a-time``: the requests of a level arrive together and are served one after another with
  batch-1 ``generate`` (what a plain HTTP wrapper around ``generate`` does); to keep the run short, 4
  requests are timed and the queue of the level is laid out from their times (see
  :func:`run_hf_one_at_a_time`);
* ``hf static batch``: all requests of a level in one left-padded ``generate`` call (best case for
  ``generate``; no HTTP, every request waits for the whole batch).

Beside the HTTP rows, ``engine in-process`` submits the same requests as the static batch to a sapwood
``Engine`` in the bench's own process: continuous batching against the static batch without HTTP and
without the clients, which share the machine with the server; wall and CPU seconds.

Every request generates exactly ``max_tokens`` tokens (``ignore_eos``; ``eos_token_id=None`` in HF).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from sapwood.bench.harness import Result, write_suite
from sapwood.errors import SapwoodError
from sapwood.infer.engine import Engine
from sapwood.infer.scheduler import SchedulerConfig


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def random_checkpoint(preset: str, out: Path) -> Path:
    """A random-weight checkpoint of ``preset`` with a BPE tokenizer trained on stdlib sources."""
    from sapwood.config import load_config
    from sapwood.data.text import stdlib_corpus, train_tokenizer
    from sapwood.model.folder import build_model, save_folder

    config = load_config(preset)
    documents = [p.read_text(errors="ignore") for p in stdlib_corpus(40)]
    tokenizer = train_tokenizer(documents, config.model.vocab_size)
    tokenizer_path = out / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    torch.manual_seed(0)
    model = build_model(config)
    return save_folder(model, config, out / "model", tokenizer_file=tokenizer_path)


def bench_prompts(count: int, tokenizer_path: Path) -> list[str]:
    """Prompts of 16..64 tokens cut from stdlib sources (deterministic)."""
    from tokenizers import Tokenizer

    from sapwood.data.text import stdlib_corpus

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    text = "\n".join(p.read_text(errors="ignore") for p in stdlib_corpus(20))
    ids = tokenizer.encode(text).ids
    prompts, cursor = [], 0
    for i in range(count):
        length = 16 + (i * 37) % 49
        prompts.append(tokenizer.decode(ids[cursor : cursor + length]))
        cursor += length
    return prompts


class ServerProcess:
    """``sapwood serve FOLDER`` on a loopback port the system picks (``--port 0``), in a child process; its
    address comes from its log, written once it listens."""

    def __init__(self, folder: Path, max_batch: int, device: str = "cpu"):
        env = {k: v for k, v in os.environ.items() if k != "SAPWOOD_API_KEYS"}
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "sapwood.cli", "serve", str(folder), "--port", "0", "--max-batch",
                str(max_batch), "--model-name", "bench", "--device", device,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url: str | None = None
        self._address: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        """Find the address in the log, then keep draining it (a full pipe would stall the server)."""
        for line in self.process.stderr:
            found = re.search(r"sapwood serve on (http://\S+:\d+)", line)
            if found:
                self._address.put(found.group(1))
        self._address.put(None)

    def wait_ready(self, timeout: float = 180) -> None:
        try:
            self.url = self._address.get(timeout=timeout)
        except queue.Empty:
            raise SapwoodError(f"sapwood serve did not start within {timeout:g} s") from None
        if self.url is None:
            raise SapwoodError("sapwood serve exited during start-up (run it by hand to see why)")
        if httpx.get(f"{self.url}/health", timeout=timeout).status_code != 200:
            raise SapwoodError("sapwood serve started but /health is not 200")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def _one_streaming_request(url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    """Time to first token, latency, mean inter-token latency and completion tokens of one streamed
    completion, on its own connection. The client is a plain socket reader: events are timed as their bytes
    arrive and only the closing usage event is parsed, so the clients, which share the machine with the
    server, take as little of it as they can (an HTTP library costs them several times more per event)."""
    body = json.dumps(
        {
            "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True},
        }
    ).encode()
    address = httpx.URL(url)
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (address.host.encode(), len(body), body)
    )
    first = last = None
    tokens = 0
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise SapwoodError(f"bench request failed: {head[:200]!r} {await reader.read(2000)!r}")
        pending = b""
        while chunk := await reader.read(1 << 16):
            now = time.perf_counter() - start
            # chunked transfer framing sits between events; each event is one "data: ...\n\n"
            *events, pending = (pending + chunk).split(b"\n\n")
            for event in events:
                data = event[event.find(b"data: ") + 6 :] if b"data: " in event else b""
                if data.startswith(b'{"error"'):
                    raise SapwoodError(f"bench request failed while streaming: {data!r}")
                if not data.startswith(b"{"):
                    continue
                if b'"choices":[]' in data:  # the closing usage event
                    tokens = json.loads(data)["usage"]["completion_tokens"]
                else:
                    last = now
                    first = now if first is None else first
    finally:
        writer.close()
    first, last = first or 0.0, last or 0.0
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return {"ttft": first, "latency": time.perf_counter() - start, "itl": itl, "tokens": tokens}


def run_ours(
    url: str, prompts: list[str], concurrency: int, max_tokens: int | list[int], server_pid: int | None = None
) -> dict[str, float]:
    """Clients at ``concurrency`` over ``prompts``; ``max_tokens`` per request or one for all. With
    ``server_pid``, ``cpu_s`` is the CPU seconds of the server process and of these clients together."""
    import psutil

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    server = psutil.Process(server_pid) if server_pid is not None else None

    def cpu_now() -> float:
        return time.process_time() + (sum(server.cpu_times()[:2]) if server is not None else 0.0)

    async def level() -> tuple[float, float, list[dict[str, float]]]:
        await _one_streaming_request(url, prompts[0], 4)  # warm-up
        gate = asyncio.Semaphore(concurrency)

        async def gated(prompt: str, tokens: int) -> dict[str, float]:
            async with gate:
                return await asyncio.wait_for(_one_streaming_request(url, prompt, tokens), 600)

        start, cpu = time.perf_counter(), cpu_now()
        results = await asyncio.gather(*[gated(p, n) for p, n in zip(prompts, lengths, strict=True)])
        return time.perf_counter() - start, cpu_now() - cpu, results

    wall, cpu, results = asyncio.run(level())
    tokens = sum(r["tokens"] for r in results)
    if tokens != sum(lengths):
        raise SapwoodError(f"expected {sum(lengths)} generated tokens, got {tokens}")
    summary = summarize(wall, tokens, [r["ttft"] for r in results], [r["latency"] for r in results])
    itls = [r["itl"] for r in results]
    ttfts = [r["ttft"] for r in results]
    return summary | {
        "ttft_p99_ms": 1000 * percentile(ttfts, 99), "itl_p50_ms": 1000 * percentile(itls, 50),
        "itl_p99_ms": 1000 * percentile(itls, 99), "cpu_s": cpu,
    }


def summarize(wall: float, tokens: int, ttfts: list[float], latencies: list[float]) -> dict[str, float]:
    return {
        "tokens_per_s": tokens / wall, "wall_s": wall, "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "latency_p50_ms": 1000 * percentile(latencies, 50),
        "latency_p99_ms": 1000 * percentile(latencies, 99),
    }


class _FirstTokenTimer:
    """A transformers streamer that records when the first new token comes out."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first put is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _hf_greedy(
    hf, ids: torch.Tensor, mask: torch.Tensor, max_tokens: int, timer: _FirstTokenTimer
) -> torch.Tensor:
    """Exactly ``max_tokens`` greedy tokens for every row (no end of sequence), as the sapwood requests."""
    with torch.inference_mode():
        return hf.generate(
            ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0, streamer=timer,
        )


def run_hf_one_at_a_time(
    hf, tokenizer, prompts: list[str], max_tokens: int, measured: int = 4
) -> dict[str, float]:
    """All requests arrive at t=0 and are served one after another with batch-1 generate.

    Only the first ``measured`` requests are generated (each timed: service time and first-token time);
    the queue of all ``len(prompts)`` requests is then laid out from those times, cycling through them:
    request ``i`` starts when ``i - 1`` ends. Tokens/s does not depend on the queue length.
    """
    service, first_token = [], []
    for prompt in prompts[:measured]:
        ids = torch.tensor([tokenizer.encode(prompt).ids], device=hf.device)
        timer = _FirstTokenTimer()
        start = time.perf_counter()
        out = _hf_greedy(hf, ids, torch.ones_like(ids), max_tokens, timer)
        service.append(time.perf_counter() - start)
        first_token.append(timer.first - start)
        assert out.shape[1] == ids.shape[1] + max_tokens
    clock, ttfts, latencies = 0.0, [], []
    for i in range(len(prompts)):
        ttfts.append(clock + first_token[i % len(service)])
        clock += service[i % len(service)]
        latencies.append(clock)
    return summarize(clock, len(prompts) * max_tokens, ttfts, latencies)


def run_hf_static_batch(hf, tokenizer, prompts: list[str], max_tokens: int | list[int]) -> dict[str, float]:
    """All requests in one left-padded generate call. With one ``max_tokens`` per request the batch runs to
    the longest and only each request's own tokens count (what a static batch of mixed requests yields)."""
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    max_tokens = max(lengths)
    encoded = [tokenizer.encode(p).ids for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, width - len(e) :] = torch.tensor(e)
        mask[row, width - len(e) :] = 1
    ids, mask = ids.to(hf.device), mask.to(hf.device)
    timer = _FirstTokenTimer()
    start, cpu = time.perf_counter(), time.process_time()
    out = _hf_greedy(hf, ids, mask, max_tokens, timer)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert out.shape[1] == width + max_tokens
    ttft = timer.first - start
    summary = summarize(wall, sum(lengths), [ttft] * len(prompts), [wall] * len(prompts))
    itl = (wall - ttft) / max(1, max_tokens - 1)
    return summary | {
        "ttft_p99_ms": 1000 * ttft, "itl_p50_ms": 1000 * itl, "itl_p99_ms": 1000 * itl, "cpu_s": cpu,
    }


def run_engine_in_process(engine, prompts: list[str], max_tokens: int | list[int]) -> dict[str, float]:
    """The same requests submitted together to a sapwood :class:`Engine` in this process (no HTTP, no
    clients): the engine against the static batch, wall and CPU seconds."""
    from sapwood.infer.sampling import SamplingParams

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    ids = [engine.tokenizer.encode(p) for p in prompts]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    start, cpu = time.perf_counter(), time.process_time()
    requests = engine.generate(ids, params)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(r.output_ids) for r in requests)
    if tokens != sum(lengths):
        raise SapwoodError(f"expected {sum(lengths)} generated tokens in process, got {tokens}")
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "cpu_s": cpu}


def mixed_lengths(count: int, max_tokens: int) -> list[int]:
    """New-token counts from max_tokens / 4 to 2 x max_tokens (deterministic; mean about max_tokens)."""
    low, high = max(1, max_tokens // 4), 2 * max_tokens
    return [low + (i * 37) % (high - low + 1) for i in range(count)]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


def _median_and_spread(runs: list[dict[str, float]], key: str) -> tuple[float, list[float]]:
    values = [r[key] for r in runs]
    return statistics.median(values), [min(values), max(values)]


def run_serve_bench(
    out: Path, levels: list[int], max_tokens: int = 32, requests_per_level: int = 0, preset: str = "tiny",
    folder: Path | None = None, repeats: int = 3, device: str = "cpu",
) -> tuple[list[Result], Path]:
    """Each level ``repeats`` times (ours and the static batch alternate); the figures are medians and each
    ratio row states its spread (min, max over the repeats) in ``params``. Two extra rows at the largest
    level: a mixed-length workload (max_tokens/4 .. 2 x max_tokens new tokens per request) and the load row
    (time to first token and inter-token latency p50 / p99 of its streaming clients)."""
    from rich.console import Console
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from sapwood.model.hf import export_hf

    console = Console()
    if not levels or min(levels) < 1:
        raise SapwoodError(f"concurrency levels {levels}: give positive integers, e.g. 1,4,16,64")
    if repeats < 1:
        raise SapwoodError(f"repeats={repeats}: give at least 1")
    work = Path(tempfile.mkdtemp(prefix="sapwood-bench-serve-"))
    given_folder = folder
    folder = Path(folder) if folder is not None else random_checkpoint(preset, work)
    export_hf(folder, work / "hf")
    hf = AutoModelForCausalLM.from_pretrained(work / "hf", torch_dtype=torch.float32).eval().to(device)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    count = {c: requests_per_level or max(c, 4) for c in levels}
    prompts = bench_prompts(max(count.values()), folder / "tokenizer.json")
    server = ServerProcess(folder, max_batch=max(levels), device=device)
    measured: dict[str, dict[str, list[dict[str, float]] | dict[str, float]]] = {}
    top = max(levels)
    engine = Engine.from_folder(folder, SchedulerConfig(max_batch=top), device=device)
    try:
        server.wait_ready()
        run_hf_one_at_a_time(hf, tokenizer, prompts[:1], 2)  # warm-up
        run_engine_in_process(engine, prompts[:4], 2)
        # as `sapwood serve` does: what is loaded stays out of the collector's full passes, which would
        # otherwise stall the clients, the engine in-process and transformers alike
        gc.collect()
        gc.freeze()
        for c in levels:
            level_prompts = prompts[: count[c]]
            static_prompts = level_prompts[:c]
            console.print(f"concurrency {c}: {len(level_prompts)} requests x {max_tokens} tokens, x{repeats}")
            ours, in_process, static = [], [], []
            for _ in range(repeats):
                ours.append(run_ours(server.url, level_prompts, c, max_tokens, server.process.pid))
                in_process.append(run_engine_in_process(engine, static_prompts, max_tokens))
                static.append(run_hf_static_batch(hf, tokenizer, static_prompts, max_tokens))
            sequential = run_hf_one_at_a_time(hf, tokenizer, level_prompts, max_tokens)
            measured[str(c)] = {
                "sapwood": ours, "engine_in_process": in_process, "hf_static_batch": static,
                "hf_one_at_a_time": sequential,
            }
            console.print(
                f"  sapwood {statistics.median(r['tokens_per_s'] for r in ours):.0f} tok/s, "
                f"engine in-process {statistics.median(r['tokens_per_s'] for r in in_process):.0f}, "
                f"hf static batch {statistics.median(r['tokens_per_s'] for r in static):.0f}, "
                f"hf one-at-a-time {sequential['tokens_per_s']:.0f}"
            )
        lengths = mixed_lengths(top, max_tokens)
        console.print(f"mixed lengths @{top}: {min(lengths)}..{max(lengths)} new tokens, x{repeats}")
        ours, in_process, static = [], [], []
        for _ in range(repeats):
            ours.append(run_ours(server.url, prompts[:top], top, lengths, server.process.pid))
            in_process.append(run_engine_in_process(engine, prompts[:top], lengths))
            static.append(run_hf_static_batch(hf, tokenizer, prompts[:top], lengths))
        measured[f"mixed@{top}"] = {
            "sapwood": ours,
            "engine_in_process": in_process,
            "hf_static_batch": static,
        }
    finally:
        server.stop()
    results = []
    params_common = {
        "max_tokens": max_tokens, "preset": preset if given_folder is None else str(given_folder),
        "threads": torch.get_num_threads(), "repeats": repeats,
    }
    static_name = "transformers generate, one left-padded batch"
    sequential_name = "transformers generate, batch 1, sequential"

    def ratio_row(
        name: str, ours: list[dict], static: list[dict], key: str, unit: str, params: dict
    ) -> Result:
        ratios = [
            _ratio(o[key], s[key]) if unit == "tokens/s" else _ratio(s[key], o[key])
            for o, s in zip(ours, static, strict=True)
        ]
        return Result(
            name, statistics.median(o[key] for o in ours), unit, statistics.median(s[key] for s in static),
            params=params | {"ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)]},
            baseline=static_name,
        )

    for c in levels:
        m = measured[str(c)]
        params = {**params_common, "concurrency": c, "requests": count[c]}
        ours, static, seq = m["sapwood"], m["hf_static_batch"], m["hf_one_at_a_time"]
        ours_tps, _ = _median_and_spread(ours, "tokens_per_s")
        in_process = m["engine_in_process"]
        results += [
            ratio_row(f"tokens/s @{c} vs hf static batch", ours, static, "tokens_per_s", "tokens/s", params),
            ratio_row(f"CPU s @{c} server + clients vs hf static batch", ours, static, "cpu_s", "s", params),
            ratio_row(
                f"tokens/s @{c} engine in-process vs hf static batch", in_process, static, "tokens_per_s",
                "tokens/s", params,
            ),
            ratio_row(
                f"CPU s @{c} engine in-process vs hf static batch", in_process, static, "cpu_s", "s", params
            ),
            Result(
                f"tokens/s @{c} vs hf one-at-a-time", ours_tps, "tokens/s", seq["tokens_per_s"],
                params=params, baseline=sequential_name,
            ),
        ]
        results += [
            Result(
                f"{label} @{c}", _median_and_spread(ours, key)[0], "ms", seq[key], params=params,
                baseline=sequential_name,
            )
            for label, key in (("TTFT p50", "ttft_p50_ms"), ("latency p99", "latency_p99_ms"))
        ]
    mixed = measured[f"mixed@{top}"]
    params = {
        **params_common, "concurrency": top, "requests": top, "new_tokens": [min(lengths), max(lengths)],
    }
    results += [
        ratio_row(
            f"tokens/s mixed lengths @{top} vs hf static batch", mixed["sapwood"], mixed["hf_static_batch"],
            "tokens_per_s", "tokens/s", params,
        ),
        ratio_row(
            f"CPU s mixed lengths @{top} server + clients vs hf static batch", mixed["sapwood"],
            mixed["hf_static_batch"], "cpu_s", "s", params,
        ),
        ratio_row(
            f"tokens/s mixed lengths @{top} engine in-process vs hf static batch", mixed["engine_in_process"],
            mixed["hf_static_batch"], "tokens_per_s", "tokens/s", params,
        ),
        ratio_row(
            f"CPU s mixed lengths @{top} engine in-process vs hf static batch", mixed["engine_in_process"],
            mixed["hf_static_batch"], "cpu_s", "s", params,
        ),
    ]
    load = measured[str(top)]
    params = {**params_common, "concurrency": top, "requests": count[top], "clients": "streaming"}
    for key, label in (
        ("tokens_per_s", "tokens/s"), ("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"),
        ("itl_p50_ms", "ITL p50"), ("itl_p99_ms", "ITL p99"),
    ):
        unit = "tokens/s" if key == "tokens_per_s" else "ms"
        results.append(
            ratio_row(
                f"load @{top} clients: {label}", load["sapwood"], load["hf_static_batch"], key, unit, params
            )
        )

    def plot(ax) -> None:
        xs = levels
        for key, label in (
            ("sapwood", "sapwood serve (HTTP)"),
            ("hf_static_batch", "HF generate, static batch"),
        ):
            ax.plot(
                xs, [statistics.median(r["tokens_per_s"] for r in measured[str(c)][key]) for c in xs],
                marker="o", label=label,
            )
        ax.plot(
            xs, [measured[str(c)]["hf_one_at_a_time"]["tokens_per_s"] for c in xs], marker="o",
            label="HF generate, one at a time",
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("generated tokens/s")
        ax.legend()

    path = write_suite("serve", results, out, plot, extra={"measured": measured})
    return results, path
