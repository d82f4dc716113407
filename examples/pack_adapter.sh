#!/usr/bin/env bash
# Adapter owner: make the keys, pack a PEFT LoRA adapter into a signed, encrypted .tssp, check it.
#
#   bash examples/pack_adapter.sh ADAPTER_DIR BASE_MODEL_DIR OUT_DIR [NAME]
#
# Writes, in OUT_DIR:
#   owner.key / owner.pub    Ed25519 signing key (keep owner.key; give owner.pub to hosts),
#                            made once and reused for every adapter of this owner
#   NAME.secret / NAME.public  this adapter's own CKKS key pair (one key per adapter: a remote
#                            key holder refuses a key shared by two adapters); NAME.secret
#                            goes only to the key holder
#   NAME.records.json        which adapter the key encrypts and the last version packed
#   NAME.tssp                the package (give it to hosts); NAME is its adapter id
#   NAME.inspect.json        what the package declares (vllm-tensafe inspect --json)
# Running it again re-packs NAME with the next adapter_version (hosts and key holders refuse
# the older package once they have seen the newer one).
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
# This adapter's CKKS key pair: B is encrypted under NAME.public; NAME.secret stays with the
# key holder.
[ -f "$out/$name.secret" ] || "$tensafe" keygen he --out "$out/$name"

"$tensafe" pack "$adapter" \
    --base-model "$base_model" \
    --signing-key "$owner.key" \
    --he-public "$out/$name.public" \
    --name "$name" \
    -o "$out/$name.tssp" --force

# What a host will check before serving it: signer trusted, digests, base-model binding.
"$tensafe" verify "$out/$name.tssp" --trusted-keys "$owner.pub" --base-model "$base_model"
"$tensafe" inspect --json --trusted-keys "$owner.pub" "$out/$name.tssp" > "$out/$name.inspect.json"
echo "package: $out/$name.tssp (manifest summary in $out/$name.inspect.json)"
