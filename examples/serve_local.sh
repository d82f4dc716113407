#!/usr/bin/env bash
# Host: serve an encrypted adapter with the stock `vllm serve` (local key holder).
#
#   bash examples/serve_local.sh BASE_MODEL_DIR PACKAGE.tssp OWNER_PREFIX [PORT] [-- VLLM ARGS...]
#
# OWNER_PREFIX is what examples/pack_adapter.sh wrote (OUT_DIR/owner): the host trusts
# OWNER_PREFIX.pub and, with the LOCAL key holder, holds OWNER_PREFIX.secret itself, so the
# package is protected at rest and in transit only (docs/threat-model.md). For a host that must
# never hold the key, see examples/remote_key_holder.sh. The adapter is served as NAME, the
# package's file name; query it with examples/openai_chat_stream.py --model NAME.
# VLLM_PLUGINS=tensafe also turns on GET /v1/tensafe/adapters (the adapter status route).
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: $0 BASE_MODEL_DIR PACKAGE.tssp OWNER_PREFIX [PORT] [-- VLLM ARGS...]" >&2
    exit 2
fi
model=$1
package=$2
owner=$3
port=${4:-8000}
shift $(( $# >= 4 ? 4 : 3 ))
[ "${1:-}" = "--" ] && shift
name=$(basename "$package" .tssp)

export VLLM_PLUGINS=${VLLM_PLUGINS:-tensafe}
exec "${VLLM:-vllm}" serve "$model" \
    --host 127.0.0.1 --port "$port" \
    --enable-tensafe \
    --tensafe-trusted-keys "$owner.pub" \
    --tensafe-he-secret "$owner.secret" \
    --lora-modules "$name=$package" \
    --max-lora-rank 64 \
    "$@"
