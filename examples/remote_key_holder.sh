#!/usr/bin/env bash
# A remote key holder: the host never holds the CKKS secret key.
#
# Owner side (where OWNER_PREFIX.secret lives):
#   bash examples/remote_key_holder.sh owner OWNER_PREFIX TOKEN_FILE [PORT]
# Host side (the vLLM machine; TOKEN_FILE holds one of the owner's tokens):
#   bash examples/remote_key_holder.sh host BASE_MODEL_DIR PACKAGE.tssp OWNER_PREFIX.pub \
#        KEY_HOLDER_URL TOKEN_FILE [PORT] [-- VLLM ARGS...]
#
# The key holder decrypts one masked batch per LoRA layer per engine step, floods every
# decryption with noise, meters ciphertexts per adapter and honours revocations
# (docs/threat-model.md says what that protects and what it does not). It listens on
# 127.0.0.1 here; anything beyond loopback needs --tls-cert/--tls-key and, on the host,
# --tensafe-key-holder-ca.
set -euo pipefail

role=${1:-}
case "$role" in
owner)
    if [ "$#" -lt 3 ]; then
        echo "usage: $0 owner OWNER_PREFIX TOKEN_FILE [PORT]" >&2
        exit 2
    fi
    exec "${VLLM_TENSAFE:-vllm-tensafe}" key-holder serve \
        --he-secret "$2.secret" \
        --token-file "$3" \
        --host 127.0.0.1 --port "${4:-8443}"
    ;;
host)
    if [ "$#" -lt 6 ]; then
        echo "usage: $0 host BASE_MODEL_DIR PACKAGE.tssp OWNER.pub KEY_HOLDER_URL TOKEN_FILE" \
            "[PORT] [-- VLLM ARGS...]" >&2
        exit 2
    fi
    model=$2
    package=$3
    trusted=$4
    url=$5
    token_file=$6
    port=${7:-8000}
    shift $(( $# >= 7 ? 7 : 6 ))
    [ "${1:-}" = "--" ] && shift
    name=$(basename "$package" .tssp)
    export VLLM_PLUGINS=${VLLM_PLUGINS:-tensafe}
    exec "${VLLM:-vllm}" serve "$model" \
        --host 127.0.0.1 --port "$port" \
        --enable-tensafe \
        --tensafe-trusted-keys "$trusted" \
        --tensafe-key-holder remote \
        --tensafe-key-holder-url "$url" \
        --tensafe-key-holder-token-file "$token_file" \
        --lora-modules "$name=$package" \
        --max-lora-rank 64 \
        "$@"
    ;;
*)
    echo "usage: $0 owner ... | $0 host ... (see the comment at the top)" >&2
    exit 2
    ;;
esac
