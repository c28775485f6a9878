#!/usr/bin/env bash
# One command for a GPU loan: equivalence, inference agreement, FSDP2, training and inference cost, reported
# to OUT/gpu-check.md and .json with a one-screen summary (docs/training.md, "Checking a GPU").
#   bash scripts/gpu-check.sh OUT                       # on a GPU: about 8 minutes at most
#   bash scripts/gpu-check.sh OUT --device cpu --quick  # the same code at small sizes, under 2 minutes
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT [--device auto|cuda|cpu] [--quick] [--budget-s S] [--sections ...]" >&2
    exit 2
fi
# The installed package (pip install -e .), so that OUT is relative to where this is run.
exec python -m phd bench gpu-check "$@"
