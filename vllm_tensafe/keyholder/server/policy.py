"""What the key holder decrypts for: its adapters, each bound to its CKKS key and manifests.

The key holder is configured with its adapters (``--adapters``): a package, a folder of
packages (only their signed manifests are read, never the ciphertexts), or a JSON policy file.
Each adapter name is bound to the CKKS key id its package was encrypted under and to the
digests of the signed manifests it accepts. A decrypt request names all three (``AdapterRef``);
anything else is refused with 403 before a single ciphertext is decrypted: an invented name, a
renamed adapter, a key not bound to the name, a package the key holder was not given.

One CKKS key per adapter is enforced here: a key bound to two adapter names is a configuration
error. A host that recovers a key with crafted ciphertexts (docs/threat-model.md) then learns
one adapter's B', which r unit-vector queries already give it, and nothing more.

JSON policy file (for deployments that keep the packages elsewhere)::

    {"adapters": [{"name": "sql-adapter", "key_id": "<64 hex>",
                   "manifests": [{"digest": "<64 hex>", "adapter_version": 3,
                                  "not_after": "2027-01-01T00:00:00Z"}],
                   "budget": 100000}]}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_tensafe.errors import ConfigError, TsspError
from vllm_tensafe.tssp.manifest import NAME_RULE, is_adapter_name, parse_utc

if TYPE_CHECKING:
    from vllm_tensafe.tssp.signing import TrustStore

_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIX_POLICY = "see docs/key-holder.md (Adapters)"


@dataclass(frozen=True)
class AcceptedManifest:
    """One signed manifest (one package) an adapter may be served from."""

    digest: str
    adapter_version: int
    not_after: str | None = None
    signer_key_id: str | None = None
    source: str = "<policy>"

    def expired(self, now: datetime | None = None) -> bool:
        if self.not_after is None:
            return False
        return (now or datetime.now(UTC)) > parse_utc(self.not_after)


@dataclass
class AdapterBinding:
    """One adapter: its name, the key ids it is bound to, the manifests it accepts."""

    name: str
    key_ids: set[str] = field(default_factory=set)
    manifests: dict[str, AcceptedManifest] = field(default_factory=dict)  # by digest
    budget: int | None = None

    @property
    def latest_version(self) -> int:
        return max((m.adapter_version for m in self.manifests.values()), default=0)


class AdapterPolicy:
    """Adapter name -> binding, and key id -> the one adapter name it is bound to."""

    def __init__(self, bindings: Iterable[AdapterBinding] = ()) -> None:
        self.adapters: dict[str, AdapterBinding] = {}
        self.key_owner: dict[str, str] = {}
        for binding in bindings:
            self.add(binding)

    # --- building --------------------------------------------------------------------------

    def add(self, binding: AdapterBinding) -> None:
        if not is_adapter_name(binding.name):
            raise ConfigError(
                f"adapter name {binding.name[:140]!r} in the key holder's policy is not allowed",
                f"use {NAME_RULE}",
            )
        existing = self.adapters.get(binding.name)
        if existing is None:
            existing = self.adapters[binding.name] = AdapterBinding(binding.name)
        for kid in binding.key_ids:
            owner = self.key_owner.get(kid)
            if owner is not None and owner != binding.name:
                raise ConfigError(
                    f"CKKS key {kid[:16]} is bound to adapters {owner!r} and {binding.name!r}; "
                    "the key holder serves one key per adapter (a host that recovers a key would "
                    "read every adapter under it)",
                    "re-pack one of them under its own key (vllm-tensafe keygen he) and give the "
                    "key holder that package and --he-secret",
                )
            self.key_owner[kid] = binding.name
            existing.key_ids.add(kid)
        existing.manifests.update(binding.manifests)
        if binding.budget is not None:
            existing.budget = binding.budget

    def bind_manifest(
        self,
        name: str,
        key_id: str,
        digest: str,
        adapter_version: int,
        not_after: str | None = None,
        signer_key_id: str | None = None,
        source: str = "<policy>",
    ) -> None:
        manifest = AcceptedManifest(digest, adapter_version, not_after, signer_key_id, source)
        self.add(AdapterBinding(name, {key_id}, {digest: manifest}))

    @classmethod
    def load(cls, path: str | os.PathLike[str], trust_store: TrustStore | None) -> AdapterPolicy:
        """From a ``.tssp``, a folder of them, or a ``.json`` policy file."""
        p = Path(path)
        policy = cls()
        if p.is_dir():
            packages = sorted(p.glob("*.tssp"))
            if not packages:
                raise ConfigError(
                    f"adapter folder {str(p)!r} holds no .tssp package",
                    "put the packages this key holder decrypts for in it",
                )
            for package in packages:
                policy._add_package(package, trust_store)
        elif p.suffix == ".tssp":
            policy._add_package(p, trust_store)
        elif p.suffix == ".json":
            policy._add_json(p)
        else:
            raise ConfigError(
                f"--adapters {str(p)!r} is not a .tssp package, a folder of them or a .json "
                "policy file",
                _FIX_POLICY,
            )
        return policy

    @classmethod
    def from_packages(
        cls, paths: Iterable[str | os.PathLike[str]], trust_store: TrustStore
    ) -> AdapterPolicy:
        policy = cls()
        for path in paths:
            policy._add_package(Path(path), trust_store)
        return policy

    def _add_package(self, path: Path, trust_store: TrustStore | None) -> None:
        from vllm_tensafe.tssp.opener import read_signed_manifest

        if trust_store is None or not len(trust_store):
            raise ConfigError(
                "the key holder needs the owners' signing keys to read packages",
                "pass --trusted-keys OWNER.pub (PUB=PATTERN pins a key to adapter names)",
            )
        try:
            signed = read_signed_manifest(path, trust=trust_store)
        except TsspError as exc:
            raise ConfigError(f"--adapters {path}: {exc.cause}", exc.fix) from None
        self.bind_manifest(
            signed.name,
            signed.key_id,
            signed.manifest_digest,
            signed.adapter_version,
            signed.not_after,
            signed.signer_key_id,
            str(path),
        )

    def _add_json(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["adapters"]
            if not isinstance(entries, list):
                raise TypeError("adapters must be a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"adapter policy {str(path)!r} cannot be read: {exc}", _FIX_POLICY
            ) from None
        for i, entry in enumerate(entries):
            where = f"adapter policy {path}, entry {i}"
            self.add(_binding_from_json(entry, where, str(path)))

    # --- queries ---------------------------------------------------------------------------

    def binding(self, name: str) -> AdapterBinding | None:
        return self.adapters.get(name)

    @property
    def key_ids(self) -> set[str]:
        return set(self.key_owner)

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def describe(self) -> str:
        return ", ".join(
            f"{b.name} (key {','.join(k[:12] for k in sorted(b.key_ids))}, "
            f"{len(b.manifests)} package(s), version <= {b.latest_version})"
            for b in self.adapters.values()
        )


def _binding_from_json(entry: Any, where: str, source: str) -> AdapterBinding:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} is not an object", _FIX_POLICY)
    unknown = set(entry) - {"name", "key_id", "manifests", "budget"}
    if unknown:
        raise ConfigError(f"{where} has unknown fields {sorted(unknown)}", _FIX_POLICY)
    name, key_id = entry.get("name"), entry.get("key_id")
    if not is_adapter_name(name):
        raise ConfigError(f"{where}: adapter name {name!r} is not allowed", f"use {NAME_RULE}")
    if not isinstance(key_id, str) or not _HEX64.fullmatch(key_id):
        raise ConfigError(f"{where}: key_id must be 64 lowercase hex digits", _FIX_POLICY)
    budget = entry.get("budget")
    if budget is not None and (
        not isinstance(budget, int) or isinstance(budget, bool) or budget < 0
    ):
        raise ConfigError(f"{where}: budget must be an integer >= 0", _FIX_POLICY)
    manifests: dict[str, AcceptedManifest] = {}
    for m in entry.get("manifests") or []:
        digest, version = m.get("digest"), m.get("adapter_version", 1)
        not_after = m.get("not_after")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ConfigError(f"{where}: manifest digest must be 64 lowercase hex", _FIX_POLICY)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"{where}: adapter_version must be an integer >= 1", _FIX_POLICY)
        if not_after is not None:
            try:
                parse_utc(not_after)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{where}: not_after must be YYYY-MM-DDTHH:MM:SSZ", _FIX_POLICY
                ) from None
        manifests[digest] = AcceptedManifest(digest, version, not_after, None, source)
    if not manifests:
        raise ConfigError(f"{where}: lists no manifest digest", _FIX_POLICY)
    return AdapterBinding(name, {key_id}, manifests, budget)
