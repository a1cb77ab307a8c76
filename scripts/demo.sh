#!/usr/bin/env bash
# Set everything up on a fresh machine and run the demo (the README's demo command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e .
hf-secure demo "$@"
