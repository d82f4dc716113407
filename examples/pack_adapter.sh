#!/usr/bin/env bash
# Adapter owner: make the keys, pack a PEFT LoRA adapter into a signed, encrypted .tssp, check it.
#
#   bash examples/pack_adapter.sh ADAPTER_DIR BASE_MODEL_DIR OUT_DIR [NAME]
#
# Writes OUT_DIR/owner.key (Ed25519 signing key: keep it), owner.pub (give it to hosts),
# owner.secret (CKKS secret key: only the key holder may hold it), owner.public (CKKS public
# context, used to encrypt) and OUT_DIR/NAME.tssp (give it to hosts). Existing keys are reused,
# so packing a second adapter keeps the same owner identity.
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: $0 ADAPTER_DIR BASE_MODEL_DIR OUT_DIR [NAME]" >&2
    exit 2
fi
adapter=$1
base_model=$2
out=$3
name=${4:-$(basename "$adapter")}
tensafe=${VLLM_TENSAFE:-vllm-tensafe}

mkdir -p "$out"
owner="$out/owner"
# Ed25519 signing key pair: hosts trust packages signed by owner.key through owner.pub.
[ -f "$owner.key" ] || "$tensafe" keygen signing --out "$owner"
# CKKS key pair: B is encrypted under owner.public; owner.secret stays with the key holder.
[ -f "$owner.secret" ] || "$tensafe" keygen he --out "$owner"

"$tensafe" pack "$adapter" \
    --base-model "$base_model" \
    --signing-key "$owner.key" \
    --he-public "$owner.public" \
    --name "$name" \
    -o "$out/$name.tssp" --force

# What a host will check before serving it: signer trusted, digests, base-model binding.
"$tensafe" verify "$out/$name.tssp" --trusted-keys "$owner.pub" --base-model "$base_model"
"$tensafe" inspect --json --trusted-keys "$owner.pub" "$out/$name.tssp" > "$out/$name.inspect.json"
echo "package: $out/$name.tssp (manifest summary in $out/$name.inspect.json)"
