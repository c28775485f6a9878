"""Start vLLM's OpenAI-compatible server on loopback for a model folder, and talk to it over HTTP.

Used by the serving tests and `phd bench serving`, so that both start the server exactly as a user does.
Standard library only (the server is a subprocess of this interpreter): importing this module loads no vLLM.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

NAME = "phd"  # --served-model-name: requests name the model by it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(folder: str | Path, log: str | Path, *extra: str, env: dict[str, str] | None = None,
          timeout: float = 600) -> Iterator[str]:
    """Run the server for `folder` until the block ends; yields its base URL (http://127.0.0.1:PORT).

    `extra`: more server arguments (e.g. "--max-model-len", "512"). The output goes to `log`, whose tail is raised
    if the server exits or is not healthy within `timeout` seconds. Started as a user does, by `phd serve` (which
    runs vLLM's server module in this interpreter).
    """
    port = free_port()
    cmd = [sys.executable, "-m", "phd", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--served-model-name", NAME, "--", *extra]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, **(env or {})}
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"vLLM server for {folder} did not start:\n"
                                           + Path(log).read_text()[-3000:]) from None
                    time.sleep(1)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def post(url: str, body: dict, timeout: float = 300) -> dict:
    """POST a JSON body, return the JSON answer."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def stream(url: str, body: dict, timeout: float = 300) -> Iterator[dict]:
    """POST a streaming request (`"stream": true` is set); yields each server-sent event's JSON."""
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for line in resp:
            text = line.decode().strip()
            if text.startswith("data: ") and text != "data: [DONE]":
                yield json.loads(text[6:])


def greedy_body(prompt: Sequence[int], max_tokens: int, **extra: object) -> dict:
    """A /v1/completions body: token-id prompt, greedy, exactly `max_tokens` new tokens, ids returned."""
    return {"model": NAME, "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}
