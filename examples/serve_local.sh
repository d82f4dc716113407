#!/usr/bin/env bash
# Host: serve an encrypted adapter with the stock `vllm serve` (local key holder).
#
#   bash examples/serve_local.sh BASE_MODEL_DIR PACKAGE.tssp OWNER_PREFIX [PORT] [-- VLLM ARGS...]
#
# OWNER_PREFIX is what examples/pack_adapter.sh wrote (OUT_DIR/owner): the host trusts
# OWNER_PREFIX.pub and, with the LOCAL key holder, holds the adapter's CKKS secret key
# (PACKAGE's NAME.secret beside it) itself, so the package is protected at rest and in transit
# only (docs/threat-model.md). For a host that must never hold the key, see
# examples/remote_key_holder.sh. The adapter is served as NAME, the package's file name; query
# it with examples/openai_chat_stream.py --model NAME. VLLM ARGS are appended (they win over
# the defaults here); extra --lora-modules are added to the encrypted adapter, never replace it.
# VLLM_PLUGINS=tensafe also turns on GET /v1/tensafe/adapters (the adapter status route). On a
# CPU machine, VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, default 1 here) bounds vLLM's memory.
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
secret="${package%.tssp}.secret"
[ -f "$secret" ] || secret="$owner.secret"  # packages made with one owner-wide key

source "$(dirname "$0")/lib.sh"
merge_lora_modules "$name=$package" "$@"

export VLLM_PLUGINS=${VLLM_PLUGINS:-tensafe}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "${VLLM:-vllm}" serve "$model" \
    --host 127.0.0.1 --port "$port" \
    --enable-tensafe \
    --tensafe-trusted-keys "$owner.pub" \
    --tensafe-he-secret "$secret" \
    --max-lora-rank 64 \
    "${VLLM_ARGS[@]}"
