"""What several ``vllm-tensafe`` commands share: passphrases, trusted keys."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Literal, overload

from vllm_tensafe.errors import ConfigError, TsspError
from vllm_tensafe.settings import env_name, split_list

if TYPE_CHECKING:
    from vllm_tensafe.tssp.signing import TrustStore

TRUSTED_KEYS_ENV = env_name("trusted_keys")


def passphrase_from_env(var: str | None) -> str | None:
    """The passphrase in environment variable ``var`` (never from argv: argv is visible to
    every user through ps and lands in shell history). An unset or empty variable is refused:
    an empty passphrase protects nothing, and taking it for "no passphrase" would hide a typo."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise ConfigError(
            f"--passphrase-env names {var}, but that environment variable is "
            f"{'empty' if value == '' else 'not set'}",
            f"export {var}=... before running, or drop --passphrase-env",
        )
    return value


def trusted_key_specs(values: list[str] | None) -> list[str]:
    """``--trusted-keys`` values (comma-separated, repeatable), else ``TENSAFE_TRUSTED_KEYS``."""
    specs = [spec for value in values or [] for spec in split_list(value)]
    return specs or split_list(os.environ.get(TRUSTED_KEYS_ENV, ""))


@overload
def trust_store_from_args(values: list[str] | None, *, required: Literal[True]) -> TrustStore: ...
@overload
def trust_store_from_args(values: list[str] | None, *, required: bool) -> TrustStore | None: ...
def trust_store_from_args(values: list[str] | None, *, required: bool) -> TrustStore | None:
    """The trust store of ``--trusted-keys`` (or ``TENSAFE_TRUSTED_KEYS``); None when neither
    names a key and ``required`` is False."""
    from vllm_tensafe.tssp.signing import TrustStore

    specs = trusted_key_specs(values)
    if not specs:
        if required:
            raise TsspError(
                "no trusted signer keys were given, so the package cannot be verified",
                f"pass --trusted-keys SIGNER.pub[,...] (or set {TRUSTED_KEYS_ENV})",
            )
        return None
    return TrustStore.from_files(specs)


def add_trusted_keys_arg(parser: argparse.ArgumentParser, required_text: str) -> None:
    parser.add_argument(
        "--trusted-keys",
        action="append",
        metavar="PUB[,PUB...]",
        help=f"Ed25519 public keys (PREFIX.pub from `keygen signing`) whose signatures you "
        f"trust; PUB=PATTERN trusts PUB only for adapter names matching the glob PATTERN; "
        f"comma-separated or repeated. Default: ${TRUSTED_KEYS_ENV}. {required_text}",
    )
