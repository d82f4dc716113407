#!/usr/bin/env bash
# Install everything, then run the linters and the whole test suite (real vLLM included).
# Extra arguments go to pytest, e.g. scripts/test.sh -k tssp
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check vllm_tensafe tests benchmarks examples scripts
exec .venv/bin/python -m pytest -ra "$@"
