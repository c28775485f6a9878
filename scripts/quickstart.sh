#!/usr/bin/env bash
# The main job on a fresh machine: install, get the default English corpus, train vanilla and PHD-CSWA-3-16-32 the
# same way (same initial weights, same batches; one process per core), print the paired difference beside the
# spread the study measured over seeds, and write a loss-curve PNG. 7.5 minutes on 2 cores, install included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh plot
exec phd compare "$@"
