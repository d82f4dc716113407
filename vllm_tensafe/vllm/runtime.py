"""Per-process TenSafe state in vLLM workers: settings, trust store, key holder, adapters.

One ``TenSafeRuntime`` lives in each process that runs model layers. It is built lazily on
the first encrypted adapter, so a worker that never sees one never talks to a key holder.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm_tensafe.settings import TenSafeSettings, load_settings

if TYPE_CHECKING:
    from vllm_tensafe.he import DeltaEngine, EncryptedMatrix
    from vllm_tensafe.keyholder import AdapterRef, KeyHolder
    from vllm_tensafe.tssp import TrustStore, TsspPackage, VersionLedger

logger = logging.getLogger("vllm_tensafe.runtime")


@dataclass
class EncryptedAdapter:
    """What a worker keeps of one opened package: A' went to vLLM, B' stays here encrypted."""

    lora_int_id: int
    name: str
    path: str
    signer_key_id: str | None
    manifest_digest: str
    rank: int
    matrices: dict[str, EncryptedMatrix]
    engine: DeltaEngine
    summary: dict[str, object] = field(default_factory=dict)
    # This adapter's share of its engine's work (an engine serves every adapter of one key);
    # updated by layers.py after each HE delta. Read by the /v1/tensafe/adapters route.
    he_calls: int = 0
    decrypt_calls: int = 0
    ciphertexts_sent: int = 0
    tokens: int = 0
    he_seconds: float = 0.0
    key_holder_seconds: float = 0.0
    failures: int = 0
    adapter_version: int = 1
    # The last key-holder refusal, and whether it said "revoked" (cleared by a success).
    last_error: str | None = None
    revoked: bool = False

    @property
    def adapter_id(self) -> str:
        # The key holder meters and revokes by this name; it is the package's signed name.
        return self.name

    @property
    def ref(self) -> AdapterRef:
        """What the key holder is told on every decrypt: name, key id, manifest digest."""
        from vllm_tensafe.keyholder.wire import AdapterRef

        return AdapterRef(self.name, self.engine.ctx.key_id, self.manifest_digest)

    def record_failure(self, exc: BaseException) -> None:
        from vllm_tensafe.errors import AdapterRevokedError

        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.revoked = isinstance(exc, AdapterRevokedError)

    def carry_usage(self, previous: EncryptedAdapter) -> None:
        """Continue the counters of the same package loaded before (vLLM evicted and reloaded
        it): the status route shows use since the server started, not since the last load."""
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(previous, name))
        self.last_error, self.revoked = previous.last_error, previous.revoked

    def status(self) -> dict[str, object]:
        """What the adapter status route shows: identity, checks, usage. Never key material,
        ciphertext bytes or key-holder credentials (the summary holds none either)."""
        return {
            **self.summary,
            "lora_int_id": self.lora_int_id,
            "path": self.path,
            "manifest_digest": self.manifest_digest,
            "adapter_version": self.adapter_version,
            "revoked": self.revoked,
            "last_error": self.last_error,
            "usage": {
                "he_calls": self.he_calls,
                "decrypt_calls": self.decrypt_calls,
                "ciphertexts_sent": self.ciphertexts_sent,
                "tokens": self.tokens,
                "he_seconds": round(self.he_seconds, 6),
                "key_holder_seconds": round(self.key_holder_seconds, 6),
                "failures": self.failures,
            },
        }


_COUNTERS = (
    "he_calls",
    "decrypt_calls",
    "ciphertexts_sent",
    "tokens",
    "he_seconds",
    "key_holder_seconds",
    "failures",
)


class TenSafeRuntime:
    def __init__(self, settings: TenSafeSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._trust_store: TrustStore | None = None
        self._key_holder: KeyHolder | None = None
        self._engines: dict[str, DeltaEngine] = {}
        self.adapters: dict[int, EncryptedAdapter] = {}
        self._versions: VersionLedger | None = None

    @property
    def versions(self) -> VersionLedger:
        """Rollback protection: the highest adapter_version seen per name, on disk."""
        if self._versions is None:
            from vllm_tensafe.tssp.versions import VersionLedger, default_version_file

            self._versions = VersionLedger(self.settings.version_file or default_version_file())
        return self._versions

    def register(self, adapter: EncryptedAdapter) -> None:
        """Keep ``adapter`` (every adapter ever loaded stays listed, with cumulative use)."""
        with self._lock:
            previous = self.adapters.get(adapter.lora_int_id)
            if previous is not None and previous.manifest_digest == adapter.manifest_digest:
                adapter.carry_usage(previous)
            self.adapters[adapter.lora_int_id] = adapter

    @property
    def trust_store(self) -> TrustStore | None:
        if not self.settings.verify_signature:
            return None
        if self._trust_store is None:
            from vllm_tensafe.tssp import TrustStore

            self._trust_store = TrustStore.from_files(self.settings.trusted_keys)
        return self._trust_store

    def open_package(self, path: str, base_model_config: dict | None) -> TsspPackage:
        """Open a package as the settings say, with rollback protection (the ledger)."""
        from vllm_tensafe.tssp import open_configured

        return open_configured(
            path,
            self.settings,
            trust=self.trust_store,
            base_model_config=base_model_config,
            versions=self.versions,
        )

    def adapter_status(self, resident: set[int] | None = None) -> list[dict[str, object]]:
        """Status of every encrypted adapter this process ever loaded; ``resident`` (the LoRA
        ids vLLM still has loaded) marks which of them are loaded now."""
        with self._lock:
            adapters = sorted(self.adapters.items())
        return [
            {**adapter.status(), "resident": resident is None or lora_id in resident}
            for lora_id, adapter in adapters
        ]

    def engine_for(self, package: TsspPackage) -> DeltaEngine:
        from vllm_tensafe.he import DeltaEngine
        from vllm_tensafe.keyholder import key_holder_from_settings

        key_id = package.public_context.key_id
        with self._lock:
            if self._key_holder is None:
                self._key_holder = key_holder_from_settings(self.settings)
            engine = self._engines.get(key_id)
            if engine is None:
                engine = DeltaEngine(package.public_context, self._key_holder)
                self._engines[key_id] = engine
            return engine

    @property
    def key_holder_kind(self) -> str:
        return self.settings.key_holder


_runtime: TenSafeRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> TenSafeRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = TenSafeRuntime(load_settings())
        return _runtime
