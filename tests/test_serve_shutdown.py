"""`sapwood serve` as a real process: SIGTERM while a request streams lets it finish, then exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from sapwood.serve.server import free_port


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(lm_folder):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SAPWOOD_API_KEYS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sapwood.cli", "serve", str(lm_folder), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        body = {"model": "tiny-lm", "prompt": "x", "max_tokens": 150, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line.removeprefix("data: "))
                if len(events) == 1:
                    process.send_signal(signal.SIGTERM)  # shut down while the request is in flight
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 150
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2]]
        assert finish[-1] == "length"
        assert process.wait(timeout=60) == 0
        log = process.stdout.read()
        assert "no SAPWOOD_API_KEYS set" in log and "loopback" in log
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
