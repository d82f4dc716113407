"""Per-process TenSafe state in vLLM workers: settings, trust store, key holder, adapters.

One ``TenSafeRuntime`` lives in each process that runs model layers. It is built lazily on
the first encrypted adapter, so a worker that never sees one never talks to a key holder.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm_tensafe.settings import TenSafeSettings, load_settings

if TYPE_CHECKING:
    from vllm_tensafe.he import AdapterRef, DeltaEngine, EncryptedMatrix, KeyHolder
    from vllm_tensafe.tssp import TrustStore, TsspPackage

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
    # Set when vLLM read the package again and could not use it (replaced, removed,
    # corrupted): every request of the adapter then fails with this error (layers.py).
    load_error: Exception | None = None

    @property
    def adapter_id(self) -> str:
        # The key holder meters and revokes by this name; it is the package's signed name.
        return self.name

    @property
    def ref(self) -> AdapterRef:
        """What the key holder is told on every decrypt: name, key id, manifest digest."""
        from vllm_tensafe.he.keyholder import AdapterRef

        return AdapterRef(self.name, self.engine.ctx.key_id, self.manifest_digest)

    def status(self) -> dict[str, object]:
        """What the adapter status route shows: identity, checks, usage. Never key material,
        ciphertext bytes or key-holder credentials (the summary holds none either)."""
        return {
            **self.summary,
            "lora_int_id": self.lora_int_id,
            "path": self.path,
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


class TenSafeRuntime:
    def __init__(self, settings: TenSafeSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._trust_store: TrustStore | None = None
        self._key_holder: KeyHolder | None = None
        self._engines: dict[str, DeltaEngine] = {}
        # Weak: an adapter lives as long as vLLM keeps its LoRA (loaded or cached) and no
        # longer, so runtime loads and unloads never pile up B' ciphertexts here.
        self.adapters: weakref.WeakValueDictionary[int, EncryptedAdapter] = (
            weakref.WeakValueDictionary()
        )

    @property
    def trust_store(self) -> TrustStore | None:
        if not self.settings.verify_signature:
            return None
        if self._trust_store is None:
            from vllm_tensafe.tssp import TrustStore

            self._trust_store = TrustStore.from_files(self.settings.trusted_keys)
        return self._trust_store

    def open_package(self, path: str, base_model_config: dict | None) -> TsspPackage:
        from vllm_tensafe import observability
        from vllm_tensafe.tssp import open_package

        try:
            package = open_package(
                path,
                trust_store=self.trust_store,
                verify_signature=self.settings.verify_signature,
                base_model_config=base_model_config,
            )
        except Exception as exc:
            observability.record_tssp_verification(observability.verification_outcome(exc))
            raise
        observability.record_tssp_verification("ok")
        return package

    def adapter_status(self, resident: set[int] | None = None) -> list[dict[str, object]]:
        """Status of the encrypted adapters this process holds (``resident``: the LoRA ids vLLM
        still has loaded; an adapter vLLM evicted is left out)."""
        with self._lock:
            adapters = sorted(self.adapters.items())
        return [
            adapter.status()
            for lora_id, adapter in adapters
            if resident is None or lora_id in resident
        ]

    def engine_for(self, package: TsspPackage) -> DeltaEngine:
        from vllm_tensafe.he import DeltaEngine
        from vllm_tensafe.he.keyholder import key_holder_from_settings

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
