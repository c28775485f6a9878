#!/usr/bin/env bash
# CI's second, smaller job: phd on the newest PyTorch that `pip install` gives where no torch is installed yet
# (pyproject allows torch>=2.6; a plain install takes the newest release, e.g. 2.14.1, whose headers need C++20).
# Its own virtual environment; the kernel build, the model, attention and inference tests.
#   PHD_NEWEST_VENV   where (default ~/.cache/phd/venv-newest-torch, outside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PHD_NEWEST_VENV:-$HOME/.cache/phd/venv-newest-torch}"
py="$venv/bin/python"
if ! "$py" -c "import torch, pytest" >/dev/null 2>&1; then
  echo "test-newest-torch: creating $venv (a plain install: the newest torch pip offers)" >&2
  python -m venv "$venv"
  "$py" -m pip install -q torch pytest >&2
fi
"$py" -m pip install -q -e . >&2
echo "test-newest-torch: torch $("$py" -c 'import torch; print(torch.__version__)')"
"$py" -m pytest -q -ra tests/test_inference_kernels.py tests/test_model.py tests/test_attention.py \
  tests/test_inference.py "$@"
