#!/usr/bin/env bash
# A remote key holder: the host never holds a CKKS secret key (docs/key-holder.md).
#
# Owner side, where examples/pack_adapter.sh wrote OUT_DIR (owner.pub, NAME.tssp, NAME.secret):
#   bash examples/remote_key_holder.sh owner OUT_DIR [PORT] [-- KEY-HOLDER SERVE ARGS...]
# Host side (the vLLM machine):
#   bash examples/remote_key_holder.sh host BASE_MODEL_DIR PACKAGE.tssp OWNER.pub \
#        KEY_HOLDER_URL TOKEN_FILE CA_FILE [PORT] [-- VLLM ARGS...]
# Revoke / un-revoke an adapter (owner side, while the key holder runs):
#   bash examples/remote_key_holder.sh revoke OUT_DIR NAME [KEY_HOLDER_URL]
#   bash examples/remote_key_holder.sh unrevoke OUT_DIR NAME [KEY_HOLDER_URL]
#
# The owner side decrypts for every OUT_DIR/NAME.tssp with its OUT_DIR/NAME.secret, and keeps
# its state in OUT_DIR/key-holder/: made on the first run with `vllm-tensafe key-holder cert`
# and `vllm-tensafe key-holder token`, a TLS certificate for 127.0.0.1, localhost and the names
# in $KH_NAMES (tls/ca.pem is the CA_FILE hosts pass), the token files (host.token for the host,
# admin.token for revoke/status), the audit log (audit.jsonl) and the revocation file
# (revoked.txt: one adapter name per line, re-read when it changes). It listens on
# ${KH_LISTEN:-127.0.0.1}; to serve other machines set KH_LISTEN=0.0.0.0 and KH_NAMES to the
# name or address hosts use. Extra arguments after `--` are appended to `key-holder serve`
# (e.g. --budget 100000, --client-ca OUT_DIR/key-holder/tls/ca.pem for client certificates).
# The host side passes everything through to `vllm serve` the same way; extra --lora-modules
# are added to the encrypted adapter, never replace it.
set -euo pipefail

tensafe=${VLLM_TENSAFE:-vllm-tensafe}
role=${1:-}
case "$role" in
owner)
    if [ "$#" -lt 2 ]; then
        echo "usage: $0 owner OUT_DIR [PORT] [-- KEY-HOLDER SERVE ARGS...]" >&2
        exit 2
    fi
    out=$2
    port=${3:-8443}
    shift $(( $# >= 3 ? 3 : 2 ))
    [ "${1:-}" = "--" ] && shift
    state="$out/key-holder"
    mkdir -p "$state"
    if [ ! -f "$state/tls/server.pem" ]; then
        names=(--host 127.0.0.1 --host localhost)
        for extra in ${KH_NAMES:-}; do names+=(--host "$extra"); done
        "$tensafe" key-holder cert --out "$state/tls" "${names[@]}"
    fi
    [ -f "$state/host.token" ] || "$tensafe" key-holder token \
        --token-file "$state/tokens" --out "$state/host.token" --role decrypt --host host
    [ -f "$state/admin.token" ] || "$tensafe" key-holder token \
        --token-file "$state/tokens" --out "$state/admin.token" --role admin --host owner
    [ -f "$state/revoked.txt" ] || : > "$state/revoked.txt"
    secrets=()
    for secret in "$out"/*.secret; do secrets+=(--he-secret "$secret"); done
    echo "host side: $0 host MODEL PACKAGE.tssp $out/owner.pub" \
        "https://127.0.0.1:$port $state/host.token $state/tls/ca.pem" >&2
    exec "$tensafe" key-holder serve \
        "${secrets[@]}" \
        --adapters "$out" \
        --trusted-keys "$out/owner.pub" \
        --token-file "$state/tokens" \
        --audit-log "$state/audit.jsonl" \
        --revoked-file "$state/revoked.txt" \
        --tls-cert "$state/tls/server.pem" --tls-key "$state/tls/server.key" \
        --host "${KH_LISTEN:-127.0.0.1}" --port "$port" \
        "$@"
    ;;
host)
    if [ "$#" -lt 7 ]; then
        echo "usage: $0 host BASE_MODEL_DIR PACKAGE.tssp OWNER.pub KEY_HOLDER_URL TOKEN_FILE" \
            "CA_FILE [PORT] [-- VLLM ARGS...]" >&2
        exit 2
    fi
    model=$2
    package=$3
    trusted=$4
    url=$5
    token_file=$6
    ca=$7
    port=${8:-8000}
    shift $(( $# >= 8 ? 8 : 7 ))
    [ "${1:-}" = "--" ] && shift
    name=$(basename "$package" .tssp)
    source "$(dirname "$0")/lib.sh"
    merge_lora_modules "$name=$package" "$@"
    export VLLM_PLUGINS=${VLLM_PLUGINS:-tensafe}
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
    # Before the model loads, the plugin checks the key holder (TLS with this CA, its
    # subjectAltName, the token, the package's key) and refuses to start with the cause.
    exec "${VLLM:-vllm}" serve "$model" \
        --host 127.0.0.1 --port "$port" \
        --enable-tensafe \
        --tensafe-trusted-keys "$trusted" \
        --tensafe-key-holder remote \
        --tensafe-key-holder-url "$url" \
        --tensafe-key-holder-token-file "$token_file" \
        --tensafe-key-holder-ca "$ca" \
        --max-lora-rank 64 \
        "${VLLM_ARGS[@]}"
    ;;
revoke | unrevoke)
    if [ "$#" -lt 3 ]; then
        echo "usage: $0 $role OUT_DIR NAME [KEY_HOLDER_URL]" >&2
        exit 2
    fi
    state="$2/key-holder"
    exec "$tensafe" key-holder "$role" "$3" \
        --url "${4:-https://127.0.0.1:8443}" \
        --token-file "$state/admin.token" \
        --ca "$state/tls/ca.pem"
    ;;
*)
    echo "usage: $0 owner ... | $0 host ... | $0 revoke|unrevoke ... (see the comment at the top)" >&2
    exit 2
    ;;
esac
