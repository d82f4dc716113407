"""CKKS (TenSEAL) core of HE-LoRA: keys, packing of B', the host's delta engine, key holders.

TenSEAL is imported only inside this package, and only when a name that needs it is first
used: importing TenSEAL takes about a second, and `vllm-tensafe --help` or reading settings
must not pay for it. See docs/he-scheme.md for the scheme, parameters, noise and flooding
analysis, and what each key holder protects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DeltaEngine": "delta",
    "DeltaStats": "delta",
    "AdapterRef": "keyholder",
    "KeyHolder": "keyholder",
    "LocalKeyHolder": "keyholder",
    "RemoteKeyHolder": "remote",
    "key_holder_from_settings": "keyholder",
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
    "KeyHolderService": "service",
}

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "AdapterRef",
    "DeltaEngine",
    "DeltaStats",
    "EncryptedMatrix",
    "HEProfile",
    "KeyHolder",
    "KeyHolderService",
    "LocalKeyHolder",
    "PublicContext",
    "RemoteKeyHolder",
    "SecretKeySet",
    "ciphertext_count",
    "encrypt_matrix",
    "generate_keys",
    "get_profile",
    "key_holder_from_settings",
    "write_keypair",
]

if TYPE_CHECKING:
    from vllm_tensafe.he.delta import DeltaEngine, DeltaStats
    from vllm_tensafe.he.keyholder import (
        AdapterRef,
        KeyHolder,
        LocalKeyHolder,
        key_holder_from_settings,
    )
    from vllm_tensafe.he.keys import PublicContext, SecretKeySet, generate_keys, write_keypair
    from vllm_tensafe.he.packing import EncryptedMatrix, ciphertext_count, encrypt_matrix
    from vllm_tensafe.he.profiles import DEFAULT_PROFILE, PROFILES, HEProfile, get_profile
    from vllm_tensafe.he.remote import RemoteKeyHolder
    from vllm_tensafe.he.service import KeyHolderService


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
