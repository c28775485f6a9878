#!/usr/bin/env bash
# The main job on a fresh machine: install, get the default English corpus, train vanilla and PHD-CSWA-3-16-32 the
# same way (same initial weights, same batches; one process per core), print the paired difference beside the
# interval the study measured for the same setting and corpus, and write a loss-curve PNG. About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh plot
exec phd compare "$@"
