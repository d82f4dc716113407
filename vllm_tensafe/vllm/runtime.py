"""Per-process TenSafe state in vLLM workers: settings, trust store, key holder, adapters.

One ``TenSafeRuntime`` lives in each process that runs model layers. It is built lazily on
the first encrypted adapter, so a worker that never sees one never talks to a key holder.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.settings import TenSafeSettings, load_settings

if TYPE_CHECKING:
    from vllm_tensafe.he import DeltaEngine, EncryptedMatrix, SecretKeySet
    from vllm_tensafe.keyholder import AdapterRef, KeyHolder
    from vllm_tensafe.tssp import TrustStore, TsspPackage, VersionLedger

logger = logging.getLogger("vllm_tensafe.runtime")


# --- which engine computes the HE deltas ----------------------------------------------------


@dataclass(frozen=True)
class HEPlan:
    """Which engine computes a worker's HE deltas, where, and whether vLLM's CUDA graphs may
    capture the HE op (graph_safety.py keeps FULL_AND_PIECEWISE only then)."""

    engine: str  # "seal" (TenSEAL, CPU) or "torch" (vllm_tensafe/he/gpu_engine.py)
    device: str  # the torch engine's device type ("cpu", "cuda"); "cpu" for seal
    captured: bool  # the op is the capturable one, with engines built before vLLM captures
    why: str  # one line: why this engine, and why (not) captured

    @property
    def label(self) -> str:
        return "seal" if self.engine == "seal" else f"torch-{self.device}"

    def describe(self) -> str:
        graphs = "captured in CUDA graphs" if self.captured else "outside CUDA graphs"
        return f"HE engine {self.label}, HE op {graphs}: {self.why}"


def plan_he(
    settings: TenSafeSettings, model_device: str, target_modules: Sequence[str] | None
) -> HEPlan:
    """The engine for a model on ``model_device`` (a torch device type) under ``settings``,
    with vLLM's ``--lora-target-modules`` (None: unset). Pure: the API server (graph guard) and
    every worker make the same choice from the same settings."""
    choice = settings.he_device
    if choice == "seal":
        return HEPlan("seal", "cpu", False, "TENSAFE_HE_DEVICE=seal")
    if choice == "cpu":
        return HEPlan("torch", "cpu", False, "TENSAFE_HE_DEVICE=cpu (no CUDA graphs on the CPU)")
    if model_device != "cuda":
        if choice == "cuda":
            raise ConfigError(
                f"TENSAFE_HE_DEVICE=cuda, but the model runs on {model_device!r}, not on a "
                "CUDA GPU",
                "set --tensafe-he-device auto (or seal, or cpu)",
            )
        return HEPlan("seal", "cpu", False, f"the model runs on {model_device!r}, not on CUDA")
    why = f"TENSAFE_HE_DEVICE={choice}, the model runs on CUDA"
    if settings.key_holder != "local":
        return HEPlan(
            "torch", "cuda", False,
            f"{why}; a remote key holder answers over the network, which no graph can replay",
        )  # fmt: skip
    if not settings.he_cuda_graphs:
        return HEPlan("torch", "cuda", False, f"{why}; TENSAFE_HE_CUDA_GRAPHS=false")
    if not target_modules:
        return HEPlan(
            "torch", "cuda", False,
            f"{why}; --lora-target-modules is unset, so the layers' engines cannot be sized "
            "before vLLM captures its graphs (set it to the modules the encrypted adapters "
            "target, e.g. q_proj v_proj, to let vLLM capture the HE op)",
        )  # fmt: skip
    return HEPlan(
        "torch", "cuda", True,
        f"{why}, local key holder, engines for --lora-target-modules "
        f"{' '.join(sorted(target_modules))} built before vLLM captures",
    )  # fmt: skip


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
    engine: DeltaEngine | None  # the TenSEAL engine; None where the torch engine runs
    summary: dict[str, object] = field(default_factory=dict)
    key_id: str = ""  # CKKS key id of the package's public context
    he_engine: str = "seal"  # HEPlan.label: seal, torch-cpu or torch-cuda
    # Why this adapter cannot be served on the device (a foreign key, a layout the layer
    # engines were not built for): every request of it fails with this error (layers.py).
    bind_error: Exception | None = None
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
    # Set when vLLM read the package again and could not use it (replaced, removed,
    # corrupted): every request of the adapter then fails with this error (layers.py).
    load_error: Exception | None = None

    @property
    def serve_error(self) -> Exception | None:
        """Why every request of this adapter must fail (its package could not be read again,
        or it cannot be put on the device); None while it can be served."""
        return self.load_error or self.bind_error

    @property
    def adapter_id(self) -> str:
        # The key holder meters and revokes by this name; it is the package's signed name.
        return self.name

    @property
    def ref(self) -> AdapterRef:
        """What the key holder is told on every decrypt: name, key id, manifest digest."""
        from vllm_tensafe.keyholder.wire import AdapterRef

        key_id = self.key_id or (self.engine.ctx.key_id if self.engine is not None else "")
        return AdapterRef(self.name, key_id, self.manifest_digest)

    def record_failure(self, exc: BaseException) -> None:
        from vllm_tensafe.errors import AdapterRevokedError

        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.revoked = isinstance(exc, AdapterRevokedError)

    def release(self) -> None:
        """vLLM dropped this adapter's LoRA (evicted it from its cache, or removed it): free
        the B' ciphertexts and keep the record. A later use loads the package again."""
        self.matrices = {}

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
        self.plan: HEPlan | None = None  # set by the first LoRA model manager (layers.py)
        self._secret: SecretKeySet | None = None
        # Called before the status is read: device counters are copied to the adapters.
        self.usage_flushers: list[Callable[[], None]] = []
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

    def plan_for(self, model_device: str, target_modules: Sequence[str] | None) -> HEPlan:
        """This worker's HEPlan (made once; logged)."""
        with self._lock:
            if self.plan is None:
                self.plan = plan_he(self.settings, model_device, target_modules)
                logger.info("TenSafe: %s", self.plan.describe())
            return self.plan

    def local_secret(self) -> SecretKeySet:
        """The local key holder's secret key set, for the torch engine (one per process)."""
        with self._lock:
            if self._secret is None:
                from vllm_tensafe.he import SecretKeySet

                if self.settings.key_holder != "local" or self.settings.he_secret is None:
                    raise ConfigError(
                        "the torch engine's local key holder needs the secret key file",
                        "set --tensafe-he-secret / TENSAFE_HE_SECRET to PREFIX.secret",
                    )

                self._secret = SecretKeySet.load(
                    self.settings.he_secret, self.settings.he_secret_passphrase
                )
            return self._secret

    def key_holder(self) -> KeyHolder:
        """The key holder the settings describe (made once per process)."""
        from vllm_tensafe.keyholder import key_holder_from_settings

        with self._lock:
            if self._key_holder is None:
                self._key_holder = key_holder_from_settings(self.settings)
            return self._key_holder

    def flush_usage(self) -> None:
        for flush in list(self.usage_flushers):
            try:
                flush()
            except Exception:  # counters must never fail a status read or a slot change
                logger.debug("Could not read the device HE counters", exc_info=True)

    def adapter_status(self, resident: set[int] | None = None) -> list[dict[str, object]]:
        """Status of every encrypted adapter this process ever loaded; ``resident`` (the LoRA
        ids vLLM still has loaded) marks which of them are loaded now."""
        self.flush_usage()
        with self._lock:
            adapters = sorted(self.adapters.items())
        return [
            {**adapter.status(), "resident": resident is None or lora_id in resident}
            for lora_id, adapter in adapters
        ]

    def engine_for(self, package: TsspPackage) -> DeltaEngine:
        """The TenSEAL engine of the package's key (one per key, shared by its adapters)."""
        from vllm_tensafe.he import DeltaEngine

        key_id = package.public_context.key_id
        holder = self.key_holder()
        with self._lock:
            engine = self._engines.get(key_id)
            if engine is None:
                engine = DeltaEngine(package.public_context, holder)
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
