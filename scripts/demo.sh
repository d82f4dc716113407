#!/usr/bin/env bash
# Install, then run the demo: a tiny model and an encrypted demo adapter served by stock
# `vllm serve --enable-tensafe`, queried with the openai client. Arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/vllm-tensafe demo "$@"
