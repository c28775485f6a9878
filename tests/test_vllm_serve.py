"""`vllm serve` with a PHD-CSWA model, as users call it: the OpenAI-compatible HTTP API on loopback.

Greedy token ids over HTTP (completions, chat with the folder's chat template, streaming) equal the native
engine's, and many concurrent requests all come back complete. Runs in the vLLM virtual environment.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("vllm")

from vllm_utils import native_greedy, prompts, write_byte_tokenizer, write_tiny  # noqa: E402

from phd.vllm.server import greedy_body, post, serve, stream  # noqa: E402

_SET_NUM_THREADS = torch.set_num_threads  # at collection, before any in-process engine replaces it

NEW = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cswa")
    model = write_tiny(folder, repeat_k=3, window=2, chunk=4)
    write_byte_tokenizer(folder)
    with serve(folder, folder / "serve.log", "--max-model-len", "256", "--max-num-seqs", "16") as base:
        yield model, base


def _complete(base: str, prompt: list[int], **extra: object) -> dict:
    return post(f"{base}/v1/completions", greedy_body(prompt, NEW, **extra))


def test_completions_equal_native(server):
    model, base = server
    prompt = prompts([11])[0]
    out = _complete(base, prompt)
    assert out["choices"][0]["token_ids"] == native_greedy(model, prompt, NEW)


def test_chat_completions_use_the_template(server):
    model, base = server
    body = {"model": "phd", "messages": [{"role": "user", "content": "Hello, PHD!"}], "max_tokens": NEW,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    out = post(f"{base}/v1/chat/completions", body)
    prompt = out["prompt_token_ids"]
    assert bytes(prompt) == b"<user>Hello, PHD!\n<assistant>"  # byte tokenizer: ids are the bytes
    assert out["choices"][0]["token_ids"] == native_greedy(model, prompt, NEW)


def test_streaming_gives_the_same_text(server):
    _, base = server
    prompt = prompts([7], seed=3)[0]
    whole = _complete(base, prompt)["choices"][0]["text"]
    body = {"model": "phd", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    pieces = [event["choices"][0]["text"] for event in stream(f"{base}/v1/completions", body)]
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_concurrent_requests_none_lost(server):
    model, base = server
    batch = prompts([3 + (5 * i) % 40 for i in range(24)], seed=4)
    with ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda p: _complete(base, p)["choices"][0]["token_ids"], batch))
    assert outs == [native_greedy(model, p, NEW) for p in batch]


def test_bench_serving_quick(tmp_path, monkeypatch):
    """`phd bench serving --quick` (two of its three variants: each server costs two vLLM process starts): the
    tiny servers started together, vLLM and native measured, the report written."""
    from phd.commands import main

    # an in-process vLLM engine (tests/test_vllm.py, same session) replaces torch.set_num_threads with a no-op; the
    # bench runs in a process of its own, so it gets the real one back here
    monkeypatch.setattr(torch, "set_num_threads", _SET_NUM_THREADS)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # the servers run as a user's do
    variants = ["vanilla", "PHD-CSWA-4-2-4"]
    assert main(["bench", "serving", "--quick", "--variants", *variants, "--work", str(tmp_path / "work"),
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "serving.json").read_text())
    keys = {(r["engine"], r["variant"], r["concurrency"]) for r in report["rows"]}
    assert keys == {(e, v, c) for e in ("vllm", "native") for v in variants for c in (1, 2)}
    assert all(r["throughput_vs_vanilla"] > 0 and r["ttft_ms"]["p50"] <= r["latency_ms"]["p99"]
               for r in report["rows"])
    assert "| vllm | PHD-CSWA-4-2-4 | 2 |" in (tmp_path / "serving.md").read_text()
    # both engines compute on the same threads: the native engine's torch threads, the cores vLLM's worker binds
    threads, env = report["settings"]["threads"], report["environment"]
    allowed = sorted(os.sched_getaffinity(0))
    assert threads == env["torch_threads"] == max(1, len(allowed) - 1)
    assert env["vllm_bind"] == ",".join(map(str, allowed[:threads]))
    assert f"VLLM_CPU_OMP_THREADS_BIND='{env['vllm_bind']}'" in (tmp_path / "work" / "vanilla.log").read_text()
