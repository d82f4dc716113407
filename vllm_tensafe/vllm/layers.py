"""Encrypted LoRA in vLLM's own LoRA layers.

vLLM keeps one stacked A and B per LoRA layer, one row per adapter slot. For a slot that holds
an encrypted adapter, A is the package's A' and B is zero, so vLLM's plaintext path computes
nothing visible; this module adds the encrypted part: for the tokens mapped to that slot,
U = x·A'^T (read from vLLM's own stacked A, already sharded for tensor parallelism) and
delta = U·B'^T through CKKS and the key holder, once per layer per engine step per adapter.

Which engine computes it follows the process's HEPlan (runtime.py): the TenSEAL engine
(he/delta.py) on the CPU, or the exact torch engine (he/gpu_engine.py, device_he.py) on the
model's GPU or the CPU. The HE step is one of two registered torch custom ops, each adding the
encrypted delta into the layer's ``output`` in place (``x, output, layer_name``); every LoRA
layer of a process uses the same one:

* ``tensafe::he_lora_delta``: Python every step (the TenSEAL engine, and the torch engine's
  eager path). torch.compile sees an opaque call; vLLM's piecewise CUDA graphs stop at it
  (graph_safety.py makes it one of vLLM's splitting ops) and run it eagerly every step. It
  writes into ``output`` rather than returning a new tensor because the next graph piece reads
  its inputs from the addresses it was captured with, as vLLM's own attention ops do. Inside a
  CUDA graph capture it refuses to run: a replay would never call it, and the encrypted delta
  would silently be missing.
* ``tensafe::he_lora_delta_device``: the torch engine's captured path: device kernels over
  persistent buffers only (device_he.py says which and why), so vLLM may capture it in its
  CUDA graphs and replay it.
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
from vllm_tensafe.vllm import device_he, patches
from vllm_tensafe.vllm.failures import get_board
from vllm_tensafe.vllm.graph_safety import DEVICE_OP_NAME, OP_NAME, verify_worker_config
from vllm_tensafe.vllm.runtime import EncryptedAdapter, get_runtime

logger = logging.getLogger("vllm_tensafe.layers")

# Layer name -> LoRA layer; the custom op receives the name (a str is a graph constant).
_LAYERS: dict[str, Any] = {}

# Which op a LoRA layer calls (module attribute ``_tensafe_op``).
SPLIT, DEVICE = "split", "device"


@dataclass
class EncryptedSlot:
    """One encrypted adapter in one layer slot: its B' per output slice (None: not targeted)."""

    adapter: EncryptedAdapter
    slices: list[Any]  # EncryptedMatrix | None per output slice of the layer
    # The torch engine's eager path: this slot's own engine (device_he.eager_engine), and how
    # many ciphertext groups it computes per token. None for the TenSEAL engine and for the
    # captured path (whose layer engine serves every slot).
    engine: Any = None
    groups: int = 0


def _slots(layer: Any) -> dict[int, EncryptedSlot]:
    slots = getattr(layer, "_tensafe_slots", None)
    if slots is None:
        slots = {}
        layer._tensafe_slots = slots
    return slots


# --- the custom ops -------------------------------------------------------------------------


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


@torch.library.custom_op(DEVICE_OP_NAME, mutates_args=("output",))
def he_lora_delta_device(x: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    """The captured path: add every slot's delta to ``output`` from persistent buffers only
    (device_he.CapturedLayer), inside or outside a CUDA graph."""
    captured = getattr(_LAYERS[layer_name], "_tensafe_captured", None)
    if captured is None:
        raise ConfigError(
            f"{DEVICE_OP_NAME} ran for layer {layer_name}, which has no device HE engine",
            f"report this as a bug (the layer should call {OP_NAME})",
        )
    captured.add_delta(x, output)


@he_lora_delta_device.register_fake
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
        _add_slot_delta(layer, slot, entry, x.index_select(0, rows), rows, output)


def _add_slot_delta(
    layer: Any,
    slot: int,
    entry: EncryptedSlot,
    xs: torch.Tensor,
    rows: torch.Tensor,
    output: torch.Tensor,
) -> None:
    board = get_board()
    adapter = entry.adapter
    if board.has_adapter_failure(adapter.lora_int_id):
        # An earlier layer of this step already failed for this adapter: its requests are
        # failed after the step and these tokens are discarded, so the key holder is not
        # asked again (its first error stands).
        return
    if adapter.serve_error is not None:
        # Its package could not be read again, or it could not be put on the device
        # (device_he.py): its requests fail, no delta. (_after_mapping records this before the
        # forward pass; this is the same rule where a layer runs without it.)
        board.record_adapter_failure(adapter.lora_int_id, adapter.name, adapter.serve_error)
        return
    if entry.engine is not None:
        _add_device_delta(entry, xs, rows, output)
        return
    engine = adapter.engine
    assert engine is not None, "an adapter on the TenSEAL path has its engine"
    xs = xs.float()
    rank = adapter.rank
    items = []
    targeted = []
    for s, matrix in enumerate(entry.slices):
        if matrix is None:
            continue
        a = layer.lora_a_stacked[s][slot, 0, :rank, :].float()
        u = (xs @ a.T).cpu().numpy().astype(np.float64, copy=False)
        items.append((u, matrix))
        targeted.append(s)
    before = _usage(engine.stats)
    started = time.perf_counter()
    try:
        results = engine.compute(adapter.ref, items)
    except Exception as exc:
        _fail(adapter, exc)
        return
    finally:
        decrypts, ciphertexts, tokens, kh_seconds = _since(engine.stats, before)
        _account(adapter, decrypts, ciphertexts, tokens, kh_seconds, time.perf_counter() - started)
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


def _add_device_delta(
    entry: EncryptedSlot, xs: torch.Tensor, rows: torch.Tensor, output: torch.Tensor
) -> None:
    """The torch engine's eager path: this slot's own engine, for this slot's tokens. Its
    output columns are the layer's (the engine keeps this rank's rows, device_he.shard_rows)."""
    adapter, engine = entry.adapter, entry.engine
    local = not hasattr(engine, "key_holder")  # GpuRemoteDeltaEngine has one
    tokens = int(xs.shape[0])
    before = _usage(engine.stats)
    started = time.perf_counter()
    try:
        slots = torch.zeros(tokens, dtype=torch.int64, device=engine.device)
        delta = engine.compute(xs.to(engine.device), slots)
    except Exception as exc:
        _fail(adapter, exc)
        return
    finally:
        decrypts, ciphertexts, _, kh_seconds = _since(engine.stats, before)
        if local:  # the key holder's work is part of the call, on the same device
            decrypts, ciphertexts = 1, tokens * entry.groups
        modules = sum(m is not None for m in entry.slices)
        seconds = time.perf_counter() - started
        _account(adapter, decrypts, ciphertexts, tokens * modules, kh_seconds, seconds)
    output[rows] += delta.to(device=output.device, dtype=output.dtype)


def _fail(adapter: EncryptedAdapter, exc: BaseException) -> None:
    # Never take the engine down with these tokens: record why, add no delta (a finite value,
    # so nothing unusual lands in the KV cache), and let the engine core fail this adapter's
    # requests and discard every token this step computed for them.
    if not isinstance(exc, TenSafeError):
        logger.exception("HE delta failed for adapter %r", adapter.name)
    get_board().record_adapter_failure(adapter.lora_int_id, adapter.name, exc)
    adapter.record_failure(exc)


def _usage(stats: Any) -> tuple[int, int, int, float]:
    return (stats.decrypt_calls, stats.ciphertexts_sent, stats.tokens, stats.seconds_key_holder)


def _since(stats: Any, before: tuple[int, int, int, float]) -> tuple[int, int, int, float]:
    # An engine may serve several adapters (the TenSEAL engine serves every adapter of one
    # CKKS key); its counters only grow, and the worker computes one delta at a time, so the
    # difference is this call's.
    decrypts, ciphertexts, tokens, kh_seconds = (
        now - then for now, then in zip(_usage(stats), before, strict=True)
    )
    return int(decrypts), int(ciphertexts), int(tokens), float(kh_seconds)


def _account(
    adapter: EncryptedAdapter,
    decrypts: int,
    ciphertexts: int,
    tokens: int,
    kh_seconds: float,
    seconds: float,
) -> None:
    adapter.he_calls += 1
    adapter.decrypt_calls += decrypts
    adapter.ciphertexts_sent += ciphertexts
    adapter.tokens += tokens
    adapter.he_seconds += seconds
    adapter.key_holder_seconds += kh_seconds
    try:
        observability.record_he_delta(
            adapter.name,
            str(adapter.summary.get("key_holder", "")),
            seconds=seconds,
            ciphertexts=ciphertexts,
            key_holder_calls=decrypts,
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
    patches.replace("lora_set_mapping", _wrap_set_mapping)


def _wrap_apply_lora_to_output(original: Any) -> Any:
    def _apply_lora_to_output(
        self: Any, x: torch.Tensor, output: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        output = original(self, x, output, *args, **kwargs)
        name = getattr(self, "_tensafe_name", None)
        op = getattr(self, "_tensafe_op", None)
        if name is None or op is None:
            return output
        flat_x = x.flatten(0, 1) if x.ndim == 3 else x
        flat_out = output.flatten(0, 1) if output.ndim == 3 else output
        # A per-process constant (the HEPlan), read when torch.compile traces this layer.
        if op == DEVICE:
            torch.ops.tensafe.he_lora_delta_device(flat_x, flat_out, name)
        else:
            torch.ops.tensafe.he_lora_delta(flat_x, flat_out, name)
        return output

    return _apply_lora_to_output


def _wrap_create(original: Any, lora_layer: type) -> Any:
    def _create_lora_modules(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        runtime = get_runtime()
        target_modules = getattr(self.lora_config, "target_modules", None)
        plan = runtime.plan_for(torch.device(self.device).type, target_modules)
        # The worker's own check of the graph settings it was built with: an engine whose
        # config skipped the guard (graph_safety.py) is refused before it serves anything.
        verify_worker_config(
            patches.resolve("get_current_vllm_config_or_none")(), captured=plan.captured
        )
        state = None
        if plan.engine == "torch":
            state = device_he.DeviceState(runtime, len(self.lora_index_to_id))
        self._tensafe_device = state
        for name, module in self.modules.items():
            if not isinstance(module, lora_layer):
                continue
            module._tensafe_name = name
            module._tensafe_slots = {}
            module._tensafe_op = SPLIT
            _LAYERS[name] = module
            if plan.captured:
                assert state is not None
                captured = device_he.build_captured_layer(
                    state, self, name, module, runtime, target_modules
                )
                module._tensafe_captured = captured
                # No targeted slice: no encrypted adapter can reach this layer (the loader
                # refuses one that targets it), so it needs no op at all.
                module._tensafe_op = DEVICE if captured is not None else None
        if plan.captured and state is not None:
            groups = sum(len(layer.engine.groups) for layer in state.layers.values())
            logger.info(
                "TenSafe: device HE engines for %d LoRA layers (%d ciphertext groups, %d adapter "
                "slots, %.2f GiB), built before vLLM captures its CUDA graphs; B' %s",
                len(state.layers),
                groups,
                state.slots,
                device_he.captured_memory_bytes(state) / 2**30,
                "held decrypted (TENSAFE_HE_FOLD_SECRET)"
                if runtime.settings.he_fold_secret
                else "stays encrypted, decrypted per step",
            )
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


def _wrap_set_mapping(original: Any) -> Any:
    def set_adapter_mapping(self: Any, mapping: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, mapping, *args, **kwargs)
        _after_mapping(self, mapping)
        return result

    return set_adapter_mapping


def _after_mapping(manager: Any, mapping: Any) -> None:
    """Every step, before the forward pass, after vLLM wrote its punica buffers."""
    state = getattr(manager, "_tensafe_device", None)
    if state is not None:
        state.refresh_token_slots()
    # Adapters that cannot be served fail their requests here, every step they are in the
    # batch: on the captured path no Python of the op runs per step to do it.
    failing = [a for a in get_runtime().adapters.values() if a.serve_error is not None]
    if failing:
        present = set(mapping.index_mapping)
        board = get_board()
        for adapter in failing:
            error = adapter.serve_error
            if adapter.lora_int_id in present and error is not None:
                # Every worker records (tensor-parallel ranks share the board; the engine core
                # keeps one cause) and counts it on its own adapter status.
                board.record_adapter_failure(adapter.lora_int_id, adapter.name, error)
                adapter.record_failure(error)


def _bind_slot(manager: Any, lora_id: int) -> None:
    index = manager.lora_index_to_id.index(lora_id)
    lora_model = manager._registered_adapters[lora_id]
    adapter: EncryptedAdapter | None = getattr(lora_model, "tensafe_adapter", None)
    state = getattr(manager, "_tensafe_device", None)
    if state is not None:
        state.assign(index, adapter)
    for name, module in manager.modules.items():
        if not hasattr(module, "_tensafe_slots"):
            continue
        captured = getattr(module, "_tensafe_captured", None)
        if adapter is None:
            _unbind(module, index)
            continue
        if adapter.load_error is not None:
            # No weights to add; registered in every layer so that its tokens are failed
            # (_after_mapping fails them on the captured path, where no Python runs per step).
            if captured is not None:
                captured.unbind(index)
            module._tensafe_slots[index] = EncryptedSlot(
                adapter=adapter, slices=[None] * module.n_slices
            )
            continue
        slices = device_he.adapter_slices(manager, name, adapter)
        if len(slices) != module.n_slices:
            raise RuntimeError(
                f"encrypted adapter {adapter.name!r}: layer {name} has {module.n_slices} "
                f"output slices but {len(slices)} sub-modules; this layer layout is not "
                "supported for encrypted adapters"
            )
        if not any(s is not None for s in slices):
            _unbind(module, index)
            continue
        entry = EncryptedSlot(adapter=adapter, slices=slices)
        if adapter.bind_error is None:
            try:
                _bind_device(manager, module, captured, index, adapter, entry)
            except TenSafeError as exc:
                logger.error("Encrypted adapter %r cannot be served: %s", adapter.name, exc)
                adapter.bind_error = exc
        if adapter.bind_error is not None and captured is not None:
            captured.unbind(index)
        module._tensafe_slots[index] = entry


def _bind_device(
    manager: Any,
    module: Any,
    captured: Any,
    index: int,
    adapter: EncryptedAdapter,
    entry: EncryptedSlot,
) -> None:
    """Put the adapter's modules of this layer on the torch engine, if it runs there."""
    if captured is not None:
        a = device_he.a_primes(module, index, entry.slices, adapter.rank)
        captured.bind(index, entry.slices, a, adapter.name)
    elif adapter.he_engine != "seal":
        state = manager._tensafe_device
        engine = device_he.eager_engine(state, module, adapter, entry.slices, index)
        entry.engine = engine
        entry.groups = engine.groups_used(0)


def _unbind(module: Any, index: int) -> None:
    module._tensafe_slots.pop(index, None)
    captured = getattr(module, "_tensafe_captured", None)
    if captured is not None:
        captured.unbind(index)


def _clear_slot(manager: Any, index: int) -> None:
    state = getattr(manager, "_tensafe_device", None)
    if state is not None:
        state.assign(index, None)
    for module in manager.modules.values():
        if getattr(module, "_tensafe_slots", None) is not None:
            _unbind(module, index)
