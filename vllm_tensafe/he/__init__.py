"""CKKS (TenSEAL) core of HE-LoRA: keys, packing of B', the host's delta engine, the shared math.

TenSEAL is imported only inside this package, and only when a name that needs it is first
used: importing TenSEAL takes about a second, and `vllm-tensafe --help` or reading settings
must not pay for it. See docs/he-scheme.md for the scheme, parameters, noise and flooding
analysis. Who decrypts (the local key holder, the key-holder service and its client) is
vllm_tensafe/keyholder/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_tensafe._lazy import lazy_exports

if TYPE_CHECKING:
    from vllm_tensafe.he.delta import DeltaEngine, DeltaStats
    from vllm_tensafe.he.keys import PublicContext, SecretKeySet, generate_keys, write_keypair
    from vllm_tensafe.he.packing import EncryptedMatrix, ciphertext_count, encrypt_matrix
    from vllm_tensafe.he.profiles import DEFAULT_PROFILE, PROFILES, HEProfile, get_profile

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "DeltaEngine",
    "DeltaStats",
    "EncryptedMatrix",
    "HEProfile",
    "PublicContext",
    "SecretKeySet",
    "ciphertext_count",
    "encrypt_matrix",
    "generate_keys",
    "get_profile",
    "write_keypair",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "DeltaEngine": "delta",
        "DeltaStats": "delta",
        "PublicContext": "keys",
        "SecretKeySet": "keys",
        "generate_keys": "keys",
        "write_keypair": "keys",
        "EncryptedMatrix": "packing",
        "ciphertext_count": "packing",
        "encrypt_matrix": "packing",
        "DEFAULT_PROFILE": "profiles",
        "PROFILES": "profiles",
        "HEProfile": "profiles",
        "get_profile": "profiles",
    },
    globals(),
)
