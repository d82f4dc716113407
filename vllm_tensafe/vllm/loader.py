"""Load a ``.tssp`` path wherever vLLM takes a LoRA path.

The package is opened (signature, trusted signer, digests, base-model binding, shapes) before
any of it is used. vLLM then receives an ordinary ``LoRAModel`` whose A is the package's mixed
A' and whose B is zero: vLLM's own shrink computes U = x·A'^T in the slot, and the encrypted
layer hook (layers.py) adds U·B'^T through the key holder. The plaintext B never exists here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from vllm_tensafe.errors import UnsupportedAdapterError
from vllm_tensafe.vllm.runtime import EncryptedAdapter, get_runtime

logger = logging.getLogger("vllm_tensafe.loader")

TSSP_SUFFIX = ".tssp"
_PEFT_PREFIX = "base_model.model."


def is_tssp_path(path: str | os.PathLike[str] | None) -> bool:
    return path is not None and os.fspath(path).endswith(TSSP_SUFFIX)


def load_encrypted_lora(manager: Any, lora_request: Any) -> Any:
    """``WorkerLoRAManager._load_adapter`` for ``.tssp`` paths. Raises TenSafeError subclasses."""
    from vllm.lora.peft_helper import PEFTHelper

    runtime = get_runtime()
    lora_config = manager.lora_config
    if getattr(lora_config, "fully_sharded_loras", False):
        raise UnsupportedAdapterError(
            "encrypted adapters do not support --fully-sharded-loras",
            "start vLLM without --fully-sharded-loras",
        )
    model = manager._adapter_manager.model
    package = runtime.open_package(lora_request.lora_path, text_config_dict(model.config))

    peft_helper = PEFTHelper.from_dict(
        {
            "r": package.rank,
            "lora_alpha": package.alpha,
            "target_modules": list(package.target_modules),
            "use_rslora": package.use_rslora,
            "vllm_max_position_embeddings": manager.max_position_embeddings,
        }
    )
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

    lora_model_cls = manager._lora_model_cls
    hf_to_vllm_mapper = getattr(model, "hf_to_vllm_mapper", None)
    if hf_to_vllm_mapper is not None:
        hf_to_vllm_mapper = hf_to_vllm_mapper.get_rename_mapper()
    lora = lora_model_cls.from_lora_tensors(
        lora_model_id=lora_request.lora_int_id,
        tensors=tensors,
        peft_helper=peft_helper,
        device="cpu",
        dtype=lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=hf_to_vllm_mapper,
    )
    adapter = EncryptedAdapter(
        lora_int_id=lora_request.lora_int_id,
        name=package.name,
        path=os.fspath(lora_request.lora_path),
        signer_key_id=package.signer_key_id,
        manifest_digest=package.manifest_digest,
        rank=package.rank,
        matrices={name: entry.encrypted_b for name, entry in package.modules.items()},
        engine=runtime.engine_for(package),
        summary={
            "name": package.name,
            "signer_key_id": package.signer_key_id,
            "signature_verified": package.signature_verified,
            "rank": package.rank,
            "alpha": package.alpha,
            "modules": len(package.modules),
            "he_profile": package.public_context.profile.name,
            "key_holder": runtime.key_holder_kind,
            "base_model": {
                "architecture": package.base_binding.get("architecture"),
                "model_type": package.base_binding.get("model_type"),
                "fingerprint": package.base_binding.get("fingerprint"),
            },
        },
    )
    lora.tensafe_adapter = adapter  # read by the activation hook in layers.py
    runtime.adapters[lora_request.lora_int_id] = adapter
    logger.info(
        "Loaded encrypted adapter %r (id %d, rank %d, %d modules, signer %s) from %s",
        package.name,
        lora_request.lora_int_id,
        package.rank,
        len(package.modules),
        package.signer_key_id or "NOT VERIFIED",
        lora_request.lora_path,
    )
    return lora


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
    from vllm.lora.worker_manager import WorkerLoRAManager

    original = WorkerLoRAManager._load_adapter
    if getattr(original, "_tensafe", False):
        return

    def _load_adapter(self: Any, lora_request: Any) -> Any:
        if is_tssp_path(lora_request.lora_path):
            return load_encrypted_lora(self, lora_request)
        return original(self, lora_request)

    _load_adapter._tensafe = True  # type: ignore[attr-defined]
    WorkerLoRAManager._load_adapter = _load_adapter  # type: ignore[method-assign]
