#!/usr/bin/env bash
# The main job on a fresh machine: install, get the default English corpus, train a small PHD-CSWA model and a
# vanilla model of the same size the same way, and print both validation losses side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec phd compare "$@"
