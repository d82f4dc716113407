"""``vllm-tensafe keygen signing | he``: the adapter owner's keys."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vllm_tensafe.cli.common import passphrase_from_env
from vllm_tensafe.settings import PROFILE_NAMES


def add_commands(subparsers: Any) -> None:
    keygen = subparsers.add_parser(
        "keygen",
        help="make a signing key pair or a CKKS (HE) key pair",
        description="Make the adapter owner's keys: an Ed25519 signing key pair (who made a "
        "package) or a CKKS key pair (the secret key decrypts; the public part encrypts).",
    )
    kinds = keygen.add_subparsers(dest="kind", metavar="KIND", required=True)

    signing = kinds.add_parser(
        "signing",
        help="Ed25519 key pair: PREFIX.key (private, 0600) and PREFIX.pub (give to hosts)",
        description="Write PREFIX.key (Ed25519 private key, PKCS8 PEM, mode 0600, encrypted "
        "when --passphrase-env is given) and PREFIX.pub (SubjectPublicKeyInfo PEM). Hosts list "
        "PREFIX.pub in --tensafe-trusted-keys; PREFIX.key never leaves the adapter owner.",
    )
    signing.add_argument("--out", required=True, metavar="PREFIX", help="output path prefix")
    signing.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the private key with the passphrase in environment variable VAR",
    )
    signing.add_argument("--force", action="store_true", help="replace existing key files")
    signing.set_defaults(handler=_keygen_signing)

    he = kinds.add_parser(
        "he",
        help="CKKS key pair: PREFIX.secret (key holder only) and PREFIX.public (for pack)",
        description="Write PREFIX.secret (CKKS secret key; only the key holder may have it) "
        "and PREFIX.public (public context without secret key; `pack --he-public` encrypts "
        "with it and it travels inside every package).",
    )
    he.add_argument("--out", required=True, metavar="PREFIX", help="output path prefix")
    he.add_argument(
        "--profile",
        choices=PROFILE_NAMES,
        default="default",
        help="HE parameter profile (default: %(default)s; 128-bit security)",
    )
    he.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the secret key file with the passphrase in environment variable VAR",
    )
    he.add_argument("--force", action="store_true", help="replace existing key files")
    he.set_defaults(handler=_keygen_he)


def _keygen_signing(args: argparse.Namespace) -> int:
    from vllm_tensafe.tssp.signing import key_id, load_public_key, write_signing_keypair

    key_path, pub_path = write_signing_keypair(
        args.out, passphrase=passphrase_from_env(args.passphrase_env), force=args.force
    )
    kid = key_id(load_public_key(pub_path))
    print(f"wrote {key_path} (private, keep it secret) and {pub_path} (public)")
    print(f"signer key id: {kid}")
    return 0


def _keygen_he(args: argparse.Namespace) -> int:
    passphrase = passphrase_from_env(args.passphrase_env)
    from vllm_tensafe.he import PublicContext, write_keypair

    secret_path, public_path = write_keypair(
        args.out, profile=args.profile, passphrase=passphrase, force=args.force
    )
    ctx = PublicContext.from_bytes(Path(public_path).read_bytes())
    print(f"wrote {secret_path} (CKKS secret key: key holder only) and {public_path} (public)")
    print(f"HE profile {args.profile}, public key id: {ctx.key_id}")
    return 0
