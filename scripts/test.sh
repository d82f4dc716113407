#!/usr/bin/env bash
# Install everything, then run the linters and the tests.
#   scripts/test.sh          linters + the whole suite, real vLLM included (about 30 minutes
#                            on 2 cores)
#   scripts/test.sh --fast   linters + every test that starts no vLLM (about 4 minutes):
#                            deselects the markers vllm and slow (pyproject.toml)
# Other arguments go to pytest, e.g. scripts/test.sh -k tssp, scripts/test.sh --fast -x
set -euo pipefail
cd "$(dirname "$0")/.."

fast=0
args=()
for arg in "$@"; do
  if [[ "$arg" == --fast ]]; then
    fast=1
  else
    args+=("$arg")
  fi
done

bash scripts/install.sh
.venv/bin/ruff check vllm_tensafe tests benchmarks examples scripts
.venv/bin/ruff format --check vllm_tensafe tests benchmarks examples scripts
.venv/bin/pyright  # basic mode over the package ([tool.pyright] in pyproject.toml)
if (( fast )); then
  # The coverage-guided fuzzing runs 10 s here, 30 s in the full suite.
  export TENSAFE_FUZZ_SECONDS="${TENSAFE_FUZZ_SECONDS:-10}"
  exec .venv/bin/python -m pytest -ra -m "not vllm and not slow" ${args[@]+"${args[@]}"}
fi
# The 20 slowest tests at the end: the suite's length is watched (about 30 minutes on 2 cores).
exec .venv/bin/python -m pytest -ra --durations=20 ${args[@]+"${args[@]}"}
