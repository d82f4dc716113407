"""``vllm-tensafe attestation enrol | check-policy | attest``: host attestation on the command line.

* ``enrol`` (on the host, with its TPM): create and persist an attestation key, write its
  public key, print the policy entry (AK file, current PCR values) for the key holder.
* ``check-policy`` (at the key holder): read a policy file and list what it accepts.
* ``attest`` (on the host): what start-up does with require_attestation, once, now.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from vllm_tensafe.errors import ConfigError

DEFAULT_HANDLE = "0x81010002"
# PC Client boot measurements: firmware (0-1), option ROMs (2-3), boot loader and kernel
# (4-5), platform state (6), Secure Boot policy (7).
DEFAULT_PCRS = "sha256:0,1,2,3,4,5,6,7"


def add_commands(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "attestation",
        help="TPM 2.0 host attestation for the remote key holder",
        description="A host proves to the remote key holder what it booted with a TPM 2.0 "
        "quote; the key holder decrypts only for hosts whose quote its policy accepts "
        "(docs/attestation.md).",
    )
    actions = group.add_subparsers(dest="attestation_command", metavar="ACTION")
    group.set_defaults(handler=lambda args: (group.print_help(), 2)[1])

    enrol = actions.add_parser(
        "enrol",
        help="create the host's attestation key and print its policy entry",
        description="Run on the host, in the boot state the key holder should accept. "
        "Creates an endorsement key and an attestation key under it (tpm2_createek, "
        "tpm2_createak), persists the AK at --handle, writes its public key to --out and "
        "prints a policy entry with the current PCR values. Needs Debian's tpm2-tools.",
    )
    enrol.add_argument("--host", required=True, help="host identity for the policy entry")
    enrol.add_argument(
        "--out", required=True, type=Path, metavar="AK.pem", help="where to write the AK's PEM"
    )
    enrol.add_argument(
        "--tcti",
        default=os.environ.get("TENSAFE_TPM_TCTI", "device:/dev/tpmrm0"),
        help="TPM to use (tpm2-tools TCTI; default TENSAFE_TPM_TCTI or device:/dev/tpmrm0)",
    )
    enrol.add_argument(
        "--handle",
        default=DEFAULT_HANDLE,
        help=f"persistent handle for the AK (default {DEFAULT_HANDLE}); set TENSAFE_TPM_AK to it",
    )
    enrol.add_argument("--key-type", choices=("rsa", "ecc"), default="rsa", help="AK algorithm")
    enrol.add_argument(
        "--pcrs",
        default=DEFAULT_PCRS,
        metavar="BANK:I,J,...",
        help=f"PCRs the policy entry expects (default {DEFAULT_PCRS})",
    )
    enrol.add_argument(
        "--reuse",
        action="store_true",
        help="if --handle already holds a key, use it (read its public key) instead of failing",
    )
    enrol.set_defaults(handler=_enrol)

    check = actions.add_parser(
        "check-policy",
        help="read an attestation policy file and list what it accepts",
        description="Validate a key holder's attestation policy (.toml or .json).",
    )
    check.add_argument("policy", type=Path, help="the policy file")
    check.set_defaults(handler=_check_policy)

    attest = actions.add_parser(
        "attest",
        help="attest this host to the configured key holder once (what start-up does)",
        description="Quote the TPM named by TENSAFE_TPM_TCTI / TENSAFE_TPM_AK and have the "
        "key holder of TENSAFE_KEY_HOLDER_URL verify it, as vLLM start-up does with "
        "TENSAFE_REQUIRE_ATTESTATION=true. Exit code 0 when the key holder accepts.",
    )
    attest.set_defaults(handler=_attest)


def _parse_pcrs(text: str) -> tuple[str, list[int]]:
    bank, _, indices = text.partition(":")
    try:
        pcrs = sorted({int(part) for part in indices.split(",") if part.strip()})
    except ValueError:
        pcrs = []
    if not bank or not pcrs:
        raise ConfigError(f"--pcrs {text!r} is not BANK:I,J,...", f"use e.g. {DEFAULT_PCRS}")
    return bank, pcrs


def _enrol(args: argparse.Namespace) -> int:
    from vllm_tensafe.attestation.tpm import (
        EnrolledKey,
        TpmQuoter,
        TpmTools,
        create_attestation_key,
    )
    from vllm_tensafe.errors import TpmError

    bank, pcrs = _parse_pcrs(args.pcrs)
    tools = TpmTools(args.tcti)
    try:
        enrolled = create_attestation_key(tools, args.handle, key_type=args.key_type)
    except TpmError as exc:
        if not (args.reuse and "already in use" in exc.cause):
            raise
        enrolled = EnrolledKey(args.handle, TpmQuoter(tools, args.handle).public_key())
    quoter = TpmQuoter(tools, enrolled.ak)
    values = quoter.read_pcrs(bank, pcrs)
    args.out.write_text(enrolled.key.pem(), encoding="utf-8")
    print(
        f"# attestation key {enrolled.key.fingerprint[:16]} at {enrolled.ak}, public key in "
        f"{args.out}\n# on this host: TENSAFE_TPM_AK={enrolled.ak} TENSAFE_TPM_TCTI={args.tcti}\n"
        "# add to the key holder's attestation policy (check that this boot is the approved "
        "one):",
        file=sys.stderr,
    )
    lines = [
        f"[hosts.{args.host}]",
        f'attestation_keys = ["{args.out.name}"]',
        f'pcr_bank = "{bank}"',
        f"[hosts.{args.host}.pcrs]",
        *(f'{index} = "{value.hex()}"' for index, value in sorted(values.items())),
    ]
    print("\n".join(lines))
    return 0


def _check_policy(args: argparse.Namespace) -> int:
    from vllm_tensafe.attestation.policy import AttestationPolicy

    policy = AttestationPolicy.load(args.policy)
    print(f"{args.policy}: {len(policy.hosts)} host(s), nonces live {policy.nonce_lifetime:g}s")
    for identity, host in sorted(policy.hosts.items()):
        keys = ", ".join(key.fingerprint[:16] for key in host.attestation_keys)
        print(
            f"  {identity}: PCRs {host.pcr_bank}:{','.join(str(i) for i in host.selection)}, "
            f"AK {keys}, quotes up to {host.max_quote_age:g}s old, sessions "
            f"{host.session_lifetime:g}s"
            + (f", tokens {', '.join(host.tokens)}" if host.tokens else "")
        )
    return 0


def _attest(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from vllm_tensafe.keyholder.remote import RemoteKeyHolder, attest_at_startup
    from vllm_tensafe.settings import TenSafeSettings, config_error_from

    try:
        settings = TenSafeSettings(require_attestation=True, key_holder="remote")
    except ValidationError as exc:
        raise config_error_from(exc) from None
    holder = RemoteKeyHolder.from_settings(settings)
    try:
        grant = attest_at_startup(holder, holder.health())
    finally:
        holder.close()
    print(
        f"attested: host {grant.host}, AK {grant.ak[:16]}, session {grant.expires_in:.0f}s"
        + (" (bound to the TLS connection)" if grant.channel_bound else "")
    )
    return 0
