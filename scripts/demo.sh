#!/usr/bin/env bash
# Install, then run the demo (examples/demo.py): a tiny model and an encrypted demo adapter
# served by stock `vllm serve --enable-tensafe`, queried with the openai client. Arguments go
# to the demo (--workdir DIR, --keep-server). It stops at the first step that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python examples/demo.py "$@"
