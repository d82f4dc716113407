"""``vllm-tensafe pack | verify | inspect``: the package workflow on the command line.

Heavy imports (numpy, TenSEAL, safetensors) happen inside the handlers, so building the
parser for ``--help`` stays instant. Handlers return an exit code; refusals are raised as
TenSafeError and printed by cli.main as one ``vllm-tensafe: error: ...`` line (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vllm_tensafe.cli.common import (
    add_trusted_keys_arg,
    passphrase_from_env,
    trust_store_from_args,
)
from vllm_tensafe.errors import KeyFileError, TsspError
from vllm_tensafe.files import refuse_overwrite


def add_commands(subparsers: Any) -> None:
    _add_pack(subparsers)
    _add_verify(subparsers)
    _add_inspect(subparsers)


# --- pack ------------------------------------------------------------------------------------


def _add_pack(subparsers: Any) -> None:
    pack = subparsers.add_parser(
        "pack",
        help="PEFT LoRA adapter -> signed, encrypted NAME.tssp",
        description="Check a PEFT LoRA adapter against its base model, mix it with a random "
        "invertible matrix, encrypt B under the CKKS public key, sign the manifest and write "
        "one .tssp file. Refuses adapters that could not be served exactly (DoRA, "
        "modules_to_save, embedding/lm_head LoRA, biases, per-module ranks, pickle weights).",
    )
    pack.add_argument(
        "adapter_dir",
        metavar="ADAPTER_DIR",
        help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
    )
    pack.add_argument(
        "--base-model",
        required=True,
        metavar="MODEL_DIR",
        help="base model folder (only its config.json is read)",
    )
    pack.add_argument(
        "--signing-key",
        required=True,
        metavar="PREFIX.key",
        help="Ed25519 private key from `keygen signing`",
    )
    pack.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the signing key's passphrase",
    )
    pack.add_argument(
        "--he-public",
        required=True,
        metavar="PREFIX.public",
        help="CKKS public context from `keygen he`",
    )
    pack.add_argument(
        "-o", "--output", required=True, metavar="NAME.tssp", help="package to write (atomically)"
    )
    pack.add_argument(
        "--name",
        help="adapter name in the package (default: NAME of NAME.tssp); the name clients request",
    )
    pack.add_argument(
        "--adapter-version",
        type=int,
        metavar="N",
        help="version of this adapter (1, 2, ...); hosts and key holders keep the highest "
        "version they have seen per adapter name and refuse older packages (rollback). "
        "Default: one more than the highest recorded for this name in the key records.",
    )
    pack.add_argument(
        "--not-after",
        metavar="DATE",
        help="expiry, UTC: YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ; after it hosts and key holders "
        "refuse the package (default: no expiry).",
    )
    pack.add_argument(
        "--key-records",
        metavar="FILE",
        help="the owner's key records: which adapter name each CKKS key encrypts and the "
        "highest version packed per name (default: PREFIX.records.json beside --he-public).",
    )
    pack.add_argument(
        "--allow-shared-key",
        action="store_true",
        help="let this CKKS key encrypt adapters of several names. Only for a local key "
        "holder: a remote key holder refuses a key bound to two adapters, because a host that "
        "recovers that key would read both (docs/threat-model.md).",
    )
    pack.add_argument(
        "--no-mix",
        action="store_true",
        help="do not mix A and B with a random matrix (debugging only: the host "
        "then sees A itself)",
    )
    pack.add_argument("--force", action="store_true", help="replace an existing output file")
    pack.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pack.set_defaults(handler=_pack)


def _load_public_context(path: str) -> Any:
    from vllm_tensafe.he import PublicContext
    from vllm_tensafe.tssp.format import HE_CONTEXT, MEMBER_LIMITS

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"cannot read CKKS public context {path!r}: {exc.strerror or exc}",
            "pass the PREFIX.public file written by `vllm-tensafe keygen he`",
        ) from None
    return PublicContext.from_bytes(data, max_size=MEMBER_LIMITS[HE_CONTEXT])


def _pack(args: argparse.Namespace) -> int:
    from vllm_tensafe.tssp.pack import default_name, pack_adapter
    from vllm_tensafe.tssp.records import KeyRecords, default_records_path
    from vllm_tensafe.tssp.signing import load_signing_key

    out = Path(args.output)
    refuse_overwrite([out], args.force)
    signing_key = load_signing_key(args.signing_key, passphrase_from_env(args.passphrase_env))
    ctx = _load_public_context(args.he_public)
    name = args.name if args.name is not None else default_name(out)
    records = KeyRecords(args.key_records or default_records_path(args.he_public))
    others = records.other_names(ctx.key_id, name)
    if others and not args.allow_shared_key:
        raise TsspError(
            f"CKKS key {ctx.key_id[:16]} ({args.he_public}) already encrypts adapter "
            f"{others[0]!r} (key records {records.path}); one key per adapter keeps a key that a "
            "host recovers from exposing any other adapter",
            "make a key for this adapter (vllm-tensafe keygen he --out NEW) and pack with "
            "--he-public NEW.public; or pass --allow-shared-key if only a local key holder "
            "will serve them",
        )
    version = args.adapter_version or records.next_version(name)
    highest = records.versions.get(name)
    if highest is not None and version < highest:
        raise TsspError(
            f"adapter {name!r} was already packed with version {highest} (key records "
            f"{records.path}); hosts that saw it refuse older versions",
            f"pass --adapter-version {highest + 1} (or leave it out to get the next one)",
        )
    path = pack_adapter(
        args.adapter_dir,
        args.base_model,
        signing_key=signing_key,
        public_context=ctx,
        out_path=out,
        name=name,
        mix=not args.no_mix,
        progress=not args.quiet,
        adapter_version=version,
        not_after=_not_after(args.not_after),
    )
    records.record(ctx.key_id, name, version)
    from vllm_tensafe.tssp.opener import read_manifest

    manifest = read_manifest(path)
    print(
        f"wrote {path}: adapter {manifest['name']!r} version {manifest['adapter_version']}, "
        f"{len(manifest['modules'])} modules, rank {manifest['lora']['rank']}, "
        f"{sum(m['ciphertexts'] for m in manifest['modules'].values())} ciphertexts, "
        f"{path.stat().st_size} bytes, signer key id {manifest['signer_key_id']}"
    )
    print(size_note(manifest, ctx.profile, path.stat().st_size))
    return 0


def size_note(manifest: dict[str, Any], profile: Any, size: int) -> str:
    """Why a package is so much larger than the adapter (it is the encryption, not waste)."""
    rank = manifest["lora"]["rank"]
    modules = manifest["modules"].values()
    plain = sum(4 * rank * (m["d_in"] + m["d_out"]) for m in modules)  # A and B in float32
    cts = sum(m["ciphertexts"] for m in modules)
    ratio = size / plain if plain else float("inf")
    return (
        f"size: {_human(size)}, about {ratio:,.0f}x the adapter's {_human(plain)} of float32 "
        f"weights. B' is encrypted as {cts} CKKS ciphertexts of "
        f"{_human(profile.ciphertext_bytes)} each (ring degree {profile.poly_modulus_degree}, "
        f"{profile.data_primes} primes, profile {profile.name}); a ciphertext is that large "
        f"whatever it holds (up to {profile.slot_count} values), so small adapters grow most. "
        "A' is stored in plaintext. This is the cost of keeping B' encrypted, not a defect."
    )


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _not_after(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.strip()
    if len(text) == 10:  # a date: the end of that day, UTC
        text += "T23:59:59Z"
    return text


# --- verify ----------------------------------------------------------------------------------


def _add_verify(subparsers: Any) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="check a .tssp: structure, signature by a trusted key, digests (exit 0 if valid)",
        description="Verify a TSSP package the way the serving host does: container "
        "structure and limits, the Ed25519 signature by one of your trusted keys, the digest "
        "of every member, and the consistency of the payloads with the manifest. Exit 0 and "
        "a one-line summary when valid; exit 1 and the reason otherwise.",
    )
    verify.add_argument("package", metavar="NAME.tssp", help="package to verify")
    add_trusted_keys_arg(verify, "Required.")
    verify.add_argument(
        "--base-model",
        metavar="MODEL_DIR",
        help="also check the package is bound to this base model (config.json)",
    )
    verify.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    from vllm_tensafe.tssp.adapter import load_base_config
    from vllm_tensafe.tssp.opener import verify_package

    store = trust_store_from_args(args.trusted_keys, required=True)
    base = load_base_config(args.base_model) if args.base_model is not None else None
    summary = verify_package(args.package, trust=store, base_model_config=base)
    print(summary.line())
    return 0


# --- inspect ---------------------------------------------------------------------------------


def _add_inspect(subparsers: Any) -> None:
    inspect = subparsers.add_parser(
        "inspect",
        help="show a .tssp's manifest, signer, base-model binding, modules and sizes",
        description="Show what a package declares: manifest, signer key id, base-model "
        "binding, modules and shapes, HE parameters, member sizes and digest status. Prints "
        "no key or ciphertext bytes. The signature is not checked unless --trusted-keys is "
        "given (then an invalid package exits 1).",
    )
    inspect.add_argument("package", metavar="NAME.tssp", help="package to inspect")
    inspect.add_argument("--json", action="store_true", help="machine-readable JSON output")
    add_trusted_keys_arg(inspect, "Optional: without it the signature is not checked.")
    inspect.set_defaults(handler=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from vllm_tensafe.tssp.opener import inspect_package

    # An explicit --trusted-keys asks for verification; the environment default does not
    # apply here, because inspecting an untrusted file is the point of this command.
    store = None
    if args.trusted_keys:
        store = trust_store_from_args(args.trusted_keys, required=True)
    report = inspect_package(args.package, trust=store)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    m = report["manifest"]
    lora, base, he = m["lora"], m["base_model"], m["he"]
    lines = [
        f"package:     {report['path']} ({report['size_bytes']} bytes, format version "
        f"{report['format_version']})",
        f"signature:   {report['signature']}",
        f"adapter:     {m['name']} version {m['adapter_version']} (created {m['created']} by "
        f"{m['tool']}; expires {m.get('not_after') or 'never'})",
        f"manifest:    sha256 {report['manifest_digest']}",
        f"signer:      key id {m['signer_key_id']}",
        f"lora:        rank {lora['rank']}, alpha {lora['alpha']:g}, scaling {lora['scaling']:g} "
        f"(folded into B'), rsLoRA {'yes' if lora['use_rslora'] else 'no'}, "
        f"mixed {'yes' if lora['mixed'] else 'NO (A is stored as is)'}",
        f"targets:     {', '.join(lora['target_modules'])}",
        f"base model:  {base['architecture']} (model_type {base['model_type']}), fingerprint "
        f"{base['fingerprint']}",
        "             "
        + ", ".join(f"{k}={v}" for k, v in sorted(base["config"].items()) if k != "architecture"),
    ]
    if base.get("name_or_path"):
        lines.append(f"             packed against {base['name_or_path']}")
    lines.append(
        f"HE:          profile {he['profile']}, N={he['poly_modulus_degree']}, coeff bits "
        f"{he['coeff_mod_bit_sizes']}, public key id {he['public_key_id']}"
    )
    lines.append(f"modules:     {len(m['modules'])}")
    width = max(len(name) for name in m["modules"])
    for name, mod in sorted(m["modules"].items()):
        lines.append(
            f"  {name:<{width}}  W ({mod['d_out']}, {mod['d_in']})  A' ({lora['rank']}, "
            f"{mod['d_in']})  B' ({mod['d_out']}, {lora['rank']}): {mod['ciphertexts']} "
            f"ciphertexts, {mod['b_size']} bytes"
        )
    lines.append("members:")
    for name, size in report["member_sizes"].items():
        status = report["member_digests"].get(name)
        suffix = f", sha256 {status}" if status else ""
        lines.append(f"  {name:<20} {size:>12} bytes{suffix}")
    return "\n".join(lines) + "\n"
