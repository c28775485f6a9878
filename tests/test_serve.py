"""`phd serve DIR` without vLLM: what it refuses, what it says where vLLM is missing, and the server command it
execs (the server itself, over HTTP, is tested in the vLLM environment: tests/test_vllm_serve.py starts every
server through `phd serve`)."""

from __future__ import annotations

import json
import sys

import pytest

from phd.commands import main, serve


@pytest.fixture
def hf_folder(tmp_path):
    folder = tmp_path / "tiny-hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "phd"}))
    return folder


def _exec_capture(monkeypatch) -> dict:
    seen: dict = {}

    def fake_execve(path, argv, env):
        seen.update(path=path, argv=argv, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(serve.os, "execve", fake_execve)
    monkeypatch.setattr(serve, "vllm_python", lambda: sys.executable)
    return seen


def test_serve_execs_vllms_server_on_loopback_with_the_options_passed_through(hf_folder, monkeypatch):
    seen = _exec_capture(monkeypatch)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    with pytest.raises(SystemExit):
        main(["serve", str(hf_folder), "--port", "8123", "--max-model-len", "512", "--", "--max-num-seqs", "4"])
    argv = seen["argv"]
    assert seen["path"] == sys.executable and argv[:3] == [sys.executable, "-m", serve.SERVER_MODULE]
    opts = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert opts["--model"] == str(hf_folder.resolve()) and opts["--host"] == "127.0.0.1"
    assert opts["--port"] == "8123" and opts["--max-model-len"] == "512" and opts["--dtype"] == "float32"
    assert opts["--served-model-name"] == "tiny-hf"
    assert argv[-2:] == ["--max-num-seqs", "4"] and "--" not in argv
    assert seen["env"]["VLLM_CPU_KVCACHE_SPACE"] == serve.KVCACHE_GIB  # not vLLM's CPU default (most of the RAM)


def test_serve_keeps_the_users_kv_cache_space_and_host(hf_folder, monkeypatch):
    seen = _exec_capture(monkeypatch)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "9")
    with pytest.raises(SystemExit):
        main(["serve", str(hf_folder), "--host", "0.0.0.0"])
    assert seen["env"]["VLLM_CPU_KVCACHE_SPACE"] == "9"
    assert seen["argv"][seen["argv"].index("--host") + 1] == "0.0.0.0"
    assert "--max-model-len" not in seen["argv"]


def test_serve_without_vllm_says_how_to_make_its_environment(hf_folder, monkeypatch, capsys):
    monkeypatch.setattr(serve, "vllm_python", lambda: None)
    assert main(["serve", str(hf_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scripts/setup-vllm.sh" in err and "PHD_VLLM_PYTHON" in err


def test_a_python_without_vllm_is_not_taken(monkeypatch, tmp_path):
    monkeypatch.setenv("PHD_VLLM_PYTHON", sys.executable)
    if serve._has_vllm(sys.executable):
        pytest.skip("this interpreter has vLLM")
    assert serve.vllm_python() is None
    monkeypatch.delenv("PHD_VLLM_PYTHON")
    monkeypatch.setenv("PHD_VLLM_VENV", str(tmp_path / "no-venv"))
    assert serve.vllm_python() is None


@pytest.mark.parametrize("content,why", [
    (None, "has no config.json"),
    ("{not json", "is not readable JSON"),
    (json.dumps({"model_type": "llama"}), "is not a phd-hf folder"),
])
def test_serve_refuses_what_is_not_a_phd_hf_folder(tmp_path, monkeypatch, capsys, content, why):
    monkeypatch.setattr(serve, "vllm_python", lambda: pytest.fail("looked for vLLM before checking the folder"))
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    assert main(["serve", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err and "--to phd-hf" in err
    assert main(["serve", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err
