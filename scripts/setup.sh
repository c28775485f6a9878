#!/usr/bin/env bash
# Install phd (editable) into the current Python. Keeps an installed torch; otherwise installs PHD_TORCH_SPEC
# (default torch==2.13.0: on the project's CPU machines that is a local CPU wheel; on a GPU machine install the
# CUDA build you want first, e.g. `pip install torch --index-url https://download.pytorch.org/whl/cu128`).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${PHD_TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".${extras:+[$extras]}"
