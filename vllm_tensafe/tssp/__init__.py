"""TSSP: the signed, encrypted LoRA package format (docs/tssp-format.md).

Modules, one job each:

* ``format``      container bytes: header, member table, limits, atomic write
* ``manifest``    canonical JSON and the manifest schema
* ``signing``     Ed25519 keys, key ids, manifest signatures, the trust store
* ``base_model``  base-model binding (architecture, fingerprint, weight shapes)
* ``adapter``     reading PEFT adapters and refusing what cannot be served
* ``mixing``      the random invertible mixing A' = R A, B' = s B R^-1
* ``lora_a``      the A' member (safetensors)
* ``ciphertexts`` the B' member (index + EncryptedMatrix blobs)
* ``pack``        adapter -> package (owner side)
* ``records``     the owner's key records: one CKKS key per adapter, next adapter_version
* ``package``     package -> verified objects (host side)
* ``versions``    rollback protection: the highest adapter_version seen per name
* ``commands``    the ``vllm-tensafe keygen/pack/verify/inspect`` subcommands

Names are exported lazily, so importing this package (which ``vllm-tensafe --help`` does)
loads neither TenSEAL nor numpy-heavy code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_tensafe.tssp.pack import pack_adapter
    from vllm_tensafe.tssp.package import (
        ModuleEntry,
        PackageSummary,
        SignedManifest,
        TsspPackage,
        inspect_package,
        open_package,
        read_signed_manifest,
        verify_package,
    )
    from vllm_tensafe.tssp.signing import (
        TrustStore,
        key_id,
        load_public_key,
        load_signing_key,
        write_signing_keypair,
    )
    from vllm_tensafe.tssp.versions import VersionLedger

_EXPORTS = {
    "ModuleEntry": "package",
    "PackageSummary": "package",
    "SignedManifest": "package",
    "TsspPackage": "package",
    "read_signed_manifest": "package",
    "VersionLedger": "versions",
    "inspect_package": "package",
    "open_package": "package",
    "verify_package": "package",
    "pack_adapter": "pack",
    "TrustStore": "signing",
    "key_id": "signing",
    "load_public_key": "signing",
    "load_signing_key": "signing",
    "write_signing_keypair": "signing",
}

__all__ = [
    "ModuleEntry",
    "PackageSummary",
    "SignedManifest",
    "TrustStore",
    "TsspPackage",
    "VersionLedger",
    "inspect_package",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "open_package",
    "pack_adapter",
    "read_signed_manifest",
    "verify_package",
    "write_signing_keypair",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
