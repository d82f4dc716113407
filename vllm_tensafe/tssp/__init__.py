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
* ``opener``      package -> verified objects (host side): ``open_package``, ``verify_package``
* ``versions``    rollback protection: the highest adapter_version seen per name

The ``vllm-tensafe keygen/pack/verify/inspect`` commands are in vllm_tensafe/cli/.

Names are exported lazily, so importing this package (which ``vllm-tensafe --help`` does)
loads neither TenSEAL nor numpy-heavy code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_tensafe._lazy import lazy_exports

if TYPE_CHECKING:
    from vllm_tensafe.tssp.opener import (
        ModuleEntry,
        PackageSummary,
        SignedManifest,
        TsspPackage,
        inspect_package,
        open_configured,
        open_package,
        open_package_unverified,
        read_signed_manifest,
        verify_package,
    )
    from vllm_tensafe.tssp.pack import pack_adapter
    from vllm_tensafe.tssp.signing import (
        TrustStore,
        key_id,
        load_public_key,
        load_signing_key,
        write_signing_keypair,
    )
    from vllm_tensafe.tssp.versions import VersionLedger

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
    "open_configured",
    "open_package",
    "open_package_unverified",
    "pack_adapter",
    "read_signed_manifest",
    "verify_package",
    "write_signing_keypair",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            (
                "ModuleEntry",
                "PackageSummary",
                "SignedManifest",
                "TsspPackage",
                "inspect_package",
                "open_configured",
                "open_package",
                "open_package_unverified",
                "read_signed_manifest",
                "verify_package",
            ),
            "opener",
        ),
        "VersionLedger": "versions",
        "pack_adapter": "pack",
        **dict.fromkeys(
            (
                "TrustStore",
                "key_id",
                "load_public_key",
                "load_signing_key",
                "write_signing_keypair",
            ),
            "signing",
        ),
    },
    globals(),
)
