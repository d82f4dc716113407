"""Encrypted LoRA in vLLM's own LoRA layers.

vLLM keeps one stacked A and B per LoRA layer, one row per adapter slot. For a slot that holds
an encrypted adapter, A is the package's A' and B is zero, so vLLM's plaintext path computes
nothing visible; this module adds the encrypted part: for the tokens mapped to that slot,
U = x·A'^T (read from vLLM's own stacked A, already sharded for tensor parallelism) and
delta = U·B'^T through CKKS and the key holder, once per layer per engine step per adapter.

The HE step is a registered torch custom op, ``torch.ops.tensafe.he_lora_delta(x, output,
layer_name)``, that adds the encrypted delta into the layer's ``output`` in place. torch.compile
sees an opaque call; vLLM's piecewise CUDA graphs stop at it (graph_safety.py makes it one of
vLLM's splitting ops) and run it eagerly every step. It writes into ``output`` rather than
returning a new tensor because the next graph piece reads its inputs from the addresses it was
captured with, as vLLM's own attention ops do. Inside a CUDA graph capture it refuses to run:
a replay would never call it, and the encrypted delta would silently be missing.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_tensafe import observability
from vllm_tensafe.errors import ConfigError, TenSafeError
from vllm_tensafe.vllm import patches
from vllm_tensafe.vllm.failures import get_board
from vllm_tensafe.vllm.graph_safety import OP_NAME, verify_worker_config
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


def _op_options() -> dict[str, Any]:
    # cudagraph_unsafe: Inductor's graph partitioning leaves the op outside CUDA graphs. A
    # torch without the tag (or without custom_op's tags) cannot partition safely;
    # graph_safety.py then refuses use_inductor_graph_partition.
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    takes_tags = "tags" in inspect.signature(torch.library.custom_op).parameters
    return {"tags": (tag,)} if tag is not None and takes_tags else {}


def _under_stream_capture(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


@torch.library.custom_op("tensafe::he_lora_delta", mutates_args=("output",), **_op_options())
def he_lora_delta(x: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    """Add the encrypted adapters' delta to ``output`` for their tokens of ``x``, in place."""
    if _under_stream_capture(output):
        raise ConfigError(
            f"{OP_NAME} ran inside a CUDA graph capture (layer {layer_name}): a replay would "
            "skip it, and encrypted adapters would answer as the base model",
            "start vLLM with --enforce-eager, or with PIECEWISE CUDA graphs "
            f"(-cc.cudagraph_mode=PIECEWISE, with {OP_NAME} in splitting_ops; TenSafe sets "
            "this up when it builds the engine config)",
        )
    add_layer_delta(_LAYERS[layer_name], x, output)


@he_lora_delta.register_fake
def _(x: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


def add_layer_delta(layer: Any, x: torch.Tensor, output: torch.Tensor) -> None:
    """Add each encrypted slot's delta to the rows of ``output`` of that slot's tokens."""
    slots = getattr(layer, "_tensafe_slots", None)
    if not slots:
        return
    indices = layer.punica_wrapper.token_lora_indices
    n = min(x.shape[0], indices.shape[0])
    token_slots = indices[:n]
    for slot, entry in list(slots.items()):
        rows = (token_slots == slot).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        _add_slot_delta(layer, slot, entry, x.index_select(0, rows).float(), rows, output)


def _add_slot_delta(
    layer: Any,
    slot: int,
    entry: EncryptedSlot,
    xs: torch.Tensor,
    rows: torch.Tensor,
    output: torch.Tensor,
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
        adapter.record_failure(exc)
        return
    finally:
        _account(adapter, before, time.perf_counter() - started)
    adapter.revoked = False  # the key holder answered: not (or no longer) revoked

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
            part = shard[:size].T.to(device=output.device, dtype=output.dtype)
            output[rows, offset : offset + size] += part
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
    """Wrap vLLM's LoRA layer output and its adapter-slot bookkeeping. Idempotent."""
    lora_layer = patches.resolve("BaseLinearLayerWithLoRA")
    patches.replace("lora_apply_output", _wrap_apply_lora_to_output)
    patches.replace("lora_create_modules", lambda original: _wrap_create(original, lora_layer))
    patches.replace("lora_activate", _wrap_activate)
    patches.replace("lora_deactivate", _wrap_deactivate)
    patches.replace("lora_remove_all", _wrap_remove_all)


def _wrap_apply_lora_to_output(original: Any) -> Any:
    def _apply_lora_to_output(
        self: Any, x: torch.Tensor, output: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        output = original(self, x, output, *args, **kwargs)
        name = getattr(self, "_tensafe_name", None)
        if name is None:
            return output
        flat_x = x.flatten(0, 1) if x.ndim == 3 else x
        flat_out = output.flatten(0, 1) if output.ndim == 3 else output
        torch.ops.tensafe.he_lora_delta(flat_x, flat_out, name)
        return output

    return _apply_lora_to_output


def _wrap_create(original: Any, lora_layer: type) -> Any:
    def _create_lora_modules(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        # The worker's own check of the graph settings it was built with: an engine whose
        # config skipped the guard (graph_safety.py) is refused before it serves anything.
        verify_worker_config(patches.resolve("get_current_vllm_config_or_none")())
        for name, module in self.modules.items():
            if isinstance(module, lora_layer):
                module._tensafe_name = name
                module._tensafe_slots = {}
                _LAYERS[name] = module
        return result

    return _create_lora_modules


def _wrap_activate(original: Any) -> Any:
    def activate_adapter(self: Any, lora_id: int, *args: Any, **kwargs: Any) -> bool:
        activated = original(self, lora_id, *args, **kwargs)
        if activated:
            _bind_slot(self, lora_id)
        return activated

    return activate_adapter


def _wrap_deactivate(original: Any) -> Any:
    def _deactivate_adapter(self: Any, lora_id: int, *args: Any, **kwargs: Any) -> Any:
        if lora_id in self.lora_index_to_id:
            _clear_slot(self, self.lora_index_to_id.index(lora_id))
        return original(self, lora_id, *args, **kwargs)

    return _deactivate_adapter


def _wrap_remove_all(original: Any) -> Any:
    def remove_all_adapters(self: Any, *args: Any, **kwargs: Any) -> Any:
        for index in range(len(self.lora_index_to_id)):
            _clear_slot(self, index)
        return original(self, *args, **kwargs)

    return remove_all_adapters


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
