"""Load a ``.tssp`` path wherever vLLM takes a LoRA path.

The package is opened (signature, trusted signer, digests, base-model binding, shapes) before
any of it is used. vLLM then receives an ordinary ``LoRAModel`` whose A is the package's mixed
A' and whose B is zero: vLLM's own shrink computes U = x·A'^T in the slot, and the encrypted
layer hook (layers.py) adds U·B'^T through the key holder. The plaintext B never exists here.
The worker's HEPlan (runtime.py) says which engine computes it: the TenSEAL engine shared by
the adapters of one key, or the torch engine, whose layer engines take B' when vLLM binds
the adapter to a slot (layers.py, device_he.py).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from vllm_tensafe.errors import (
    ForeignCiphertextError,
    PackageChangedError,
    TenSafeError,
    UnsupportedAdapterError,
)
from vllm_tensafe.vllm import patches
from vllm_tensafe.vllm.runtime import EncryptedAdapter, HEPlan, TenSafeRuntime, get_runtime

logger = logging.getLogger("vllm_tensafe.loader")

TSSP_SUFFIX = ".tssp"
_PEFT_PREFIX = "base_model.model."


def is_tssp_path(path: str | os.PathLike[str] | None) -> bool:
    return path is not None and os.fspath(path).endswith(TSSP_SUFFIX)


def load_encrypted_lora(manager: Any, lora_request: Any) -> Any:
    """``WorkerLoRAManager._load_adapter`` for ``.tssp`` paths. Raises TenSafeError subclasses."""
    peft_helper_cls = patches.resolve("PEFTHelper")

    runtime = get_runtime()
    lora_config = manager.lora_config
    if getattr(lora_config, "fully_sharded_loras", False):
        raise UnsupportedAdapterError(
            "encrypted adapters do not support --fully-sharded-loras",
            "start vLLM without --fully-sharded-loras",
        )
    model = manager._adapter_manager.model
    plan = runtime.plan_for(
        torch.device(manager._adapter_manager.device).type,
        getattr(lora_config, "target_modules", None),
    )
    started = time.perf_counter()
    logger.info(
        "Loading encrypted adapter %r in this worker: verifying the package's signature and "
        "digests and reading its CKKS ciphertexts (again only after vLLM evicted it from its "
        "adapter cache, --max-cpu-loras)",
        lora_request.lora_name,
    )
    known = _KNOWN.get(lora_request.lora_int_id)
    try:
        package = runtime.open_package(lora_request.lora_path, text_config_dict(model.config))
        if (
            known is not None
            and not getattr(lora_request, "load_inplace", False)
            and package.manifest_digest != known.manifest_digest
        ):
            raise PackageChangedError(
                f"the package {lora_request.lora_path} changed on disk after adapter "
                f"{known.name!r} was loaded from it (manifest sha256 {known.manifest_digest[:16]}"
                f", now {package.manifest_digest[:16]})",
                "restore the file, or load the new one explicitly (/v1/load_lora_adapter with "
                "load_inplace, or a restart)",
            )
    except TenSafeError as exc:
        if known is None or getattr(lora_request, "load_inplace", False):
            raise  # a first or explicit load: refused to its caller, as before
        # vLLM reads the path again after evicting the adapter from its cache, inside a model
        # step: raising here would end the engine and every request on it. Fail this adapter's
        # requests instead, through the same per-request path as a key-holder failure.
        logger.error(
            "Encrypted adapter %r (id %d) is unusable: %s", known.name, known.lora_int_id, exc
        )
        return _unusable_lora(manager, lora_request, known, exc)

    peft_dict = {
        "r": package.rank,
        "lora_alpha": package.alpha,
        "target_modules": list(package.target_modules),
        "use_rslora": package.use_rslora,
        "vllm_max_position_embeddings": manager.max_position_embeddings,
    }
    peft_helper = peft_helper_cls.from_dict(peft_dict)
    peft_helper.validate_legal(lora_config)

    supported = _expected_modules(manager)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in package.modules.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in supported:
            raise UnsupportedAdapterError(
                f"encrypted adapter {package.name!r} targets {name}, which vLLM does not "
                f"serve LoRA on for this model (supported: {', '.join(sorted(supported))})",
                "pack an adapter that targets only the supported modules",
            )
        a = torch.from_numpy(entry.lora_a).to(torch.float32)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a
        # Zero B: vLLM's plaintext expand adds nothing for this slot; the HE hook adds U·B'^T.
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = torch.zeros(
            (entry.d_out, package.rank), dtype=torch.float32
        )

    lora = _lora_model(manager, lora_request, tensors, peft_helper)
    adapter = EncryptedAdapter(
        lora_int_id=lora_request.lora_int_id,
        name=package.name,
        path=os.fspath(lora_request.lora_path),
        signer_key_id=package.signer_key_id,
        manifest_digest=package.manifest_digest,
        rank=package.rank,
        matrices={name: entry.encrypted_b for name, entry in package.modules.items()},
        engine=runtime.engine_for(package) if plan.engine == "seal" else None,
        key_id=package.public_context.key_id,
        he_engine=plan.label,
        adapter_version=package.adapter_version,
        summary={
            "name": package.name,
            "signer_key_id": package.signer_key_id,
            "signature_verified": package.signature_verified,
            "rank": package.rank,
            "alpha": package.alpha,
            "modules": len(package.modules),
            "he_profile": package.public_context.profile.name,
            "key_holder": runtime.key_holder_kind,
            "he_engine": plan.label,
            "he_graphs": "captured" if plan.captured else "outside",
            "base_model": {
                "architecture": package.base_binding.get("architecture"),
                "model_type": package.base_binding.get("model_type"),
                "fingerprint": package.base_binding.get("fingerprint"),
            },
        },
    )
    if plan.engine == "torch":
        _check_device_adapter(runtime, plan, manager, adapter)
    lora.tensafe_adapter = adapter  # read by the activation hook in layers.py
    # Every adapter ever loaded stays listed (status route), but its ciphertexts only as long
    # as vLLM keeps its LoRA: runtime load/unload cycles would otherwise pile them up.
    weakref.finalize(lora, adapter.release)
    runtime.register(adapter)
    _KNOWN[lora_request.lora_int_id] = _KnownPackage(
        lora_int_id=lora_request.lora_int_id,
        name=package.name,
        manifest_digest=package.manifest_digest,
        peft=peft_dict,
        shapes={key: tuple(value.shape) for key, value in tensors.items()},
    )
    logger.info(
        "Loaded encrypted adapter %r version %d (id %d, rank %d, %d modules, signer %s, HE "
        "engine %s) from %s in %.1fs",
        package.name,
        package.adapter_version,
        lora_request.lora_int_id,
        package.rank,
        len(package.modules),
        package.signer_key_id or "NOT VERIFIED",
        plan.label,
        lora_request.lora_path,
        time.perf_counter() - started,
    )
    return lora


@dataclass(frozen=True)
class _KnownPackage:
    """What a worker remembers of a package it loaded (no weights): enough to recognise the
    same package when vLLM reads the path again, and to stand in for it if it cannot."""

    lora_int_id: int
    name: str
    manifest_digest: str
    peft: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]


# lora_int_id -> the package first loaded under it, in this worker process.
_KNOWN: dict[int, _KnownPackage] = {}


def _lora_model(
    manager: Any, lora_request: Any, tensors: dict[str, torch.Tensor], peft_helper: Any
) -> Any:
    model = manager._adapter_manager.model
    hf_to_vllm_mapper = getattr(model, "hf_to_vllm_mapper", None)
    if hf_to_vllm_mapper is not None:
        # The mapper without its stacking rules, as vLLM's own LoRA loader uses it (the
        # method's name differs between vLLM versions: the patch table knows which).
        hf_to_vllm_mapper = patches.resolve("lora_weights_mapper")(hf_to_vllm_mapper)
    return manager._lora_model_cls.from_lora_tensors(
        lora_model_id=lora_request.lora_int_id,
        tensors=tensors,
        peft_helper=peft_helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=hf_to_vllm_mapper,
    )


def _unusable_lora(
    manager: Any, lora_request: Any, known: _KnownPackage, error: TenSafeError
) -> Any:
    """A zero LoRA of the known shapes whose every use fails its requests with ``error``."""
    peft_helper = patches.resolve("PEFTHelper").from_dict(known.peft)
    tensors = {key: torch.zeros(shape, dtype=torch.float32) for key, shape in known.shapes.items()}
    lora = _lora_model(manager, lora_request, tensors, peft_helper)
    adapter = EncryptedAdapter(
        lora_int_id=lora_request.lora_int_id,
        name=known.name,
        path=os.fspath(lora_request.lora_path),
        signer_key_id=None,
        manifest_digest=known.manifest_digest,
        rank=int(known.peft["r"]),
        matrices={},
        engine=None,  # type: ignore[arg-type]  # never asked: load_error fails first
        summary={"name": known.name, "load_error": str(error)},
        load_error=error,
    )
    lora.tensafe_adapter = adapter
    get_runtime().register(adapter)
    return lora


def _check_device_adapter(
    runtime: TenSafeRuntime, plan: HEPlan, manager: Any, adapter: EncryptedAdapter
) -> None:
    """What the torch engine cannot serve: refused now (a module the captured engines were
    not built for), or failed per request like the TenSEAL path's key-holder errors (a package
    of another key than the local key holder's)."""
    if plan.captured:
        from vllm_tensafe.vllm.device_he import check_coverage

        state = getattr(manager._adapter_manager, "_tensafe_device", None)
        if state is not None:
            check_coverage(state, list(adapter.matrices), adapter.name)
    if runtime.settings.key_holder == "local":
        secret = runtime.local_secret()
        if secret.key_id != adapter.key_id:
            # The TenSEAL path's local key holder refuses each request with this error.
            adapter.bind_error = ForeignCiphertextError(
                f"ciphertexts declare key {adapter.key_id[:16]}, this key holder holds "
                f"{secret.key_id[:16]}",
                "route the adapter to the key holder of the key it was packed with",
            )


def text_config_dict(hf_config: Any) -> dict[str, Any]:
    """The language model's config as a dict (multimodal models nest it)."""
    if hasattr(hf_config, "get_text_config"):
        hf_config = hf_config.get_text_config()
    return hf_config.to_dict()


def _expected_modules(manager: Any) -> set[str]:
    adapter_manager = manager._adapter_manager
    expected: set[str] = set()
    for module in adapter_manager.supported_lora_modules:
        expected.update(adapter_manager.packed_modules_mapping.get(module, [module]))
    return expected


def install_loader() -> None:
    """Send ``.tssp`` paths to ``load_encrypted_lora``; every other path to vLLM. Idempotent."""
    patches.check_names(
        ["PEFTHelper.from_dict", "PEFTHelper.validate_legal", "LoRAModel.from_lora_tensors"]
    )
    patches.resolve("lora_weights_mapper")

    def wrap(original: Any) -> Any:
        def _load_adapter(self: Any, lora_request: Any, *args: Any, **kwargs: Any) -> Any:
            if is_tssp_path(lora_request.lora_path):
                return load_encrypted_lora(self, lora_request)
            return original(self, lora_request, *args, **kwargs)

        return _load_adapter

    patches.replace("loader", wrap)
