"""Encrypted LoRA in vLLM's own LoRA layers.

vLLM keeps one stacked A and B per LoRA layer, one row per adapter slot. For a slot that holds
an encrypted adapter, A is the package's A' and B is zero, so vLLM's plaintext path computes
nothing visible; this module adds the encrypted part: for the tokens mapped to that slot,
U = x·A'^T (read from vLLM's own stacked A, already sharded for tensor parallelism) and
delta = U·B'^T through CKKS and the key holder, once per layer per engine step per adapter.

The HE step is a registered torch custom op (``torch.ops.tensafe.he_lora_delta``): torch.compile
sees an opaque call with a known output shape, so vLLM's default compilation works. It cannot
be captured in a CUDA graph (it calls the key holder), which is why GPU users need
``--enforce-eager`` or the op in ``compilation_config.splitting_ops`` (docs/architecture.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_tensafe import observability
from vllm_tensafe.errors import TenSafeError
from vllm_tensafe.vllm.failures import get_board
from vllm_tensafe.vllm.runtime import EncryptedAdapter

logger = logging.getLogger("vllm_tensafe.layers")

# Layer name -> LoRA layer; the custom op receives the name (a str is a graph constant).
_LAYERS: dict[str, Any] = {}


@dataclass
class EncryptedSlot:
    """One encrypted adapter in one layer slot: its B' per output slice (None: not targeted)."""

    adapter: EncryptedAdapter
    slices: list[Any]  # EncryptedMatrix | None per output slice of the layer


def _slots(layer: Any) -> dict[int, EncryptedSlot]:
    slots = getattr(layer, "_tensafe_slots", None)
    if slots is None:
        slots = {}
        layer._tensafe_slots = slots
    return slots


# --- the custom op --------------------------------------------------------------------------


@torch.library.custom_op("tensafe::he_lora_delta", mutates_args=())
def he_lora_delta(x: torch.Tensor, layer_name: str, out_features: int) -> torch.Tensor:
    """Encrypted-adapter delta for every token of ``x`` (zeros for other tokens)."""
    layer = _LAYERS[layer_name]
    return compute_layer_delta(layer, x, out_features)


@he_lora_delta.register_fake
def _(x: torch.Tensor, layer_name: str, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


def compute_layer_delta(layer: Any, x: torch.Tensor, out_features: int) -> torch.Tensor:
    delta = torch.zeros((x.shape[0], out_features), dtype=x.dtype, device=x.device)
    slots = getattr(layer, "_tensafe_slots", None)
    if not slots:
        return delta
    indices = layer.punica_wrapper.token_lora_indices
    n = min(x.shape[0], indices.shape[0])
    token_slots = indices[:n]
    for slot, entry in list(slots.items()):
        rows = (token_slots == slot).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        _add_slot_delta(layer, slot, entry, x.index_select(0, rows).float(), rows, delta)
    return delta


def _add_slot_delta(
    layer: Any,
    slot: int,
    entry: EncryptedSlot,
    xs: torch.Tensor,
    rows: torch.Tensor,
    delta: torch.Tensor,
) -> None:
    board = get_board()
    if board.has_adapter_failure(entry.adapter.lora_int_id):
        # An earlier layer of this step already failed for this adapter: its requests are
        # failed after the step and these tokens are discarded, so the key holder is not
        # asked again (its first error stands).
        return
    if entry.adapter.load_error is not None:
        # Its package could not be read again: fail its requests, add nothing.
        board.record_adapter_failure(
            entry.adapter.lora_int_id, entry.adapter.name, entry.adapter.load_error
        )
        return
    rank = entry.adapter.rank
    items = []
    targeted = []
    for s, matrix in enumerate(entry.slices):
        if matrix is None:
            continue
        a = layer.lora_a_stacked[s][slot, 0, :rank, :].float()
        u = (xs @ a.T).cpu().numpy().astype(np.float64, copy=False)
        items.append((u, matrix))
        targeted.append(s)
    adapter = entry.adapter
    before = _usage(adapter.engine.stats)
    started = time.perf_counter()
    try:
        results = adapter.engine.compute(adapter.ref, items)
    except Exception as exc:
        # Never take the engine down with these tokens: record why, add no delta (a finite
        # value, so nothing unusual lands in the KV cache), and let the engine core fail this
        # adapter's requests and discard every token this step computed for them.
        if not isinstance(exc, TenSafeError):
            logger.exception("HE delta failed for adapter %r", adapter.name)
        board.record_adapter_failure(adapter.lora_int_id, adapter.name, exc)
        adapter.failures += 1
        return
    finally:
        _account(adapter, before, time.perf_counter() - started)

    # Full-width deltas, transposed to (d_out, T) so vLLM's own slice_lora_b can pick this
    # rank's shard exactly as it does for a plaintext B.
    full: list[torch.Tensor | None] = [None] * layer.n_slices
    for s, result in zip(targeted, results, strict=True):
        full[s] = torch.from_numpy(np.ascontiguousarray(result.T)).to(torch.float32)
    if layer.tp_size > 1:
        sliced = layer.slice_lora_b(full if layer.n_slices > 1 else full[0])
        shards = sliced if isinstance(sliced, list) else [sliced]
    else:
        shards = full
    offset = 0
    for s, size in enumerate(layer.output_slices):
        shard = shards[s]
        if shard is not None:
            delta[rows, offset : offset + size] += (
                shard[:size].T.to(delta.dtype, copy=False).to(delta.device)
            )
        offset += size


def _usage(stats: Any) -> tuple[int, int, int, float]:
    return (stats.decrypt_calls, stats.ciphertexts_sent, stats.tokens, stats.seconds_key_holder)


def _account(
    adapter: EncryptedAdapter, before: tuple[int, int, int, float], seconds: float
) -> None:
    # The engine is shared by every adapter of one CKKS key; its counters only grow, and the
    # worker computes one delta at a time, so the difference is this call's.
    decrypts, ciphertexts, tokens, kh_seconds = (
        now - then for now, then in zip(_usage(adapter.engine.stats), before, strict=True)
    )
    adapter.he_calls += 1
    adapter.decrypt_calls += int(decrypts)
    adapter.ciphertexts_sent += int(ciphertexts)
    adapter.tokens += int(tokens)
    adapter.he_seconds += seconds
    adapter.key_holder_seconds += kh_seconds
    try:
        observability.record_he_delta(
            adapter.name,
            str(adapter.summary.get("key_holder", "")),
            seconds=seconds,
            ciphertexts=int(ciphertexts),
            key_holder_calls=int(decrypts),
            key_holder_seconds=kh_seconds,
        )
    except Exception:  # a metrics problem must never fail a forward pass
        logger.debug("Could not record HE metrics", exc_info=True)


# --- hooks into vLLM's LoRA classes -----------------------------------------------------------


def install_layer_hooks() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager

    original_apply = BaseLinearLayerWithLoRA._apply_lora_to_output
    if getattr(original_apply, "_tensafe", False):
        return

    def _apply_lora_to_output(self: Any, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        output = original_apply(self, x, output)
        name = getattr(self, "_tensafe_name", None)
        if name is None:
            return output
        flat_x = x.flatten(0, 1) if x.ndim == 3 else x
        extra = torch.ops.tensafe.he_lora_delta(flat_x, name, output.shape[-1])
        return output + extra.view(output.shape).to(output.dtype)

    _apply_lora_to_output._tensafe = True  # type: ignore[attr-defined]
    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output  # type: ignore[method-assign]

    original_create = LoRAModelManager._create_lora_modules

    def _create_lora_modules(self: Any) -> None:
        original_create(self)
        for name, module in self.modules.items():
            if isinstance(module, BaseLinearLayerWithLoRA):
                module._tensafe_name = name
                module._tensafe_slots = {}
                _LAYERS[name] = module

    LoRAModelManager._create_lora_modules = _create_lora_modules  # type: ignore[method-assign]

    original_activate = LoRAModelManager.activate_adapter

    def activate_adapter(self: Any, lora_id: int) -> bool:
        activated = original_activate(self, lora_id)
        if activated:
            _bind_slot(self, lora_id)
        return activated

    LoRAModelManager.activate_adapter = activate_adapter  # type: ignore[method-assign]

    original_deactivate = LoRAModelManager._deactivate_adapter

    def _deactivate_adapter(self: Any, lora_id: int) -> None:
        if lora_id in self.lora_index_to_id:
            _clear_slot(self, self.lora_index_to_id.index(lora_id))
        original_deactivate(self, lora_id)

    LoRAModelManager._deactivate_adapter = _deactivate_adapter  # type: ignore[method-assign]

    original_remove_all = LoRAModelManager.remove_all_adapters

    def remove_all_adapters(self: Any) -> None:
        for index in range(len(self.lora_index_to_id)):
            _clear_slot(self, index)
        original_remove_all(self)

    LoRAModelManager.remove_all_adapters = remove_all_adapters  # type: ignore[method-assign]


def _bind_slot(manager: Any, lora_id: int) -> None:
    index = manager.lora_index_to_id.index(lora_id)
    lora_model = manager._registered_adapters[lora_id]
    adapter: EncryptedAdapter | None = getattr(lora_model, "tensafe_adapter", None)
    for name, module in manager.modules.items():
        if not hasattr(module, "_tensafe_slots"):
            continue
        if adapter is None:
            module._tensafe_slots.pop(index, None)
            continue
        if adapter.load_error is not None:
            # No weights to add; registered in every layer so that its tokens are failed.
            module._tensafe_slots[index] = EncryptedSlot(
                adapter=adapter, slices=[None] * module.n_slices
            )
            continue
        sub_modules = manager.packed_modules.get(name, [name])
        slices = [adapter.matrices.get(sub) for sub in sub_modules]
        if len(slices) != module.n_slices:
            raise RuntimeError(
                f"encrypted adapter {adapter.name!r}: layer {name} has {module.n_slices} "
                f"output slices but {len(slices)} sub-modules; this layer layout is not "
                "supported for encrypted adapters"
            )
        if any(s is not None for s in slices):
            module._tensafe_slots[index] = EncryptedSlot(adapter=adapter, slices=slices)
        else:
            module._tensafe_slots.pop(index, None)


def _clear_slot(manager: Any, index: int) -> None:
    for module in manager.modules.values():
        slots = getattr(module, "_tensafe_slots", None)
        if slots is not None:
            slots.pop(index, None)
