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
    from vllm_tensafe.he import DeltaEngine, EncryptedMatrix, KeyHolder
    from vllm_tensafe.tssp import TrustStore, TsspPackage

logger = logging.getLogger("vllm_tensafe.runtime")


@dataclass
class EncryptedAdapter:
    """What a worker keeps of one opened package: A' went to vLLM, B' stays here encrypted."""

    lora_int_id: int
    name: str
    path: str
    signer_key_id: str | None
    rank: int
    matrices: dict[str, EncryptedMatrix]
    engine: DeltaEngine
    summary: dict[str, object] = field(default_factory=dict)

    @property
    def adapter_id(self) -> str:
        # The key holder meters and revokes by this name; it is the package's signed name.
        return self.name


class TenSafeRuntime:
    def __init__(self, settings: TenSafeSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._trust_store: TrustStore | None = None
        self._key_holder: KeyHolder | None = None
        self._engines: dict[str, DeltaEngine] = {}
        self.adapters: dict[int, EncryptedAdapter] = {}

    @property
    def trust_store(self) -> TrustStore | None:
        if not self.settings.verify_signature:
            return None
        if self._trust_store is None:
            from vllm_tensafe.tssp import TrustStore

            self._trust_store = TrustStore.from_files(self.settings.trusted_keys)
        return self._trust_store

    def open_package(self, path: str, base_model_config: dict | None) -> TsspPackage:
        from vllm_tensafe.tssp import open_package

        return open_package(
            path,
            trust_store=self.trust_store,
            verify_signature=self.settings.verify_signature,
            base_model_config=base_model_config,
        )

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
