"""`sapwood serve` as a real process: SIGTERM while a request streams lets it finish, then exits cleanly."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest


def _lines(stream) -> queue.Queue:
    """The lines of ``stream`` as they come (None at its end), read on a thread."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(lm_folder):
    env = {k: v for k, v in os.environ.items() if k != "SAPWOOD_API_KEYS"}
    # --port 0: the server binds a port the system picks and logs the address once it listens
    process = subprocess.Popen(
        [sys.executable, "-m", "sapwood.cli", "serve", str(lm_folder), "--port", "0"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    log = []
    try:
        lines = _lines(process.stdout)
        url = None
        while url is None:
            line = lines.get(timeout=180)
            assert line is not None, "sapwood serve exited during start-up:\n" + "".join(log)
            log.append(line)
            found = re.search(r"sapwood serve on (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        assert not url.endswith(":0")
        body = {
            "model": "tiny-lm", "prompt": "x", "max_tokens": 150, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
        }
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
        while (line := lines.get(timeout=60)) is not None:
            log.append(line)
        text = "".join(log)
        assert "no SAPWOOD_API_KEYS set" in text and "loopback" in text
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
