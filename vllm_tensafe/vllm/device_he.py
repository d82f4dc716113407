"""HE deltas on the model's device: the torch engine (vllm_tensafe/he/gpu_engine.py) in vLLM's
LoRA layers.

runtime.plan_he picks, per process, one of two ways:

* **captured** (local key holder, model on CUDA, ``--lora-target-modules`` set,
  TENSAFE_HE_CUDA_GRAPHS on). When vLLM builds its LoRA layers, before it captures any CUDA
  graph, every LoRA layer gets ONE ``GpuDeltaEngine`` for all of vLLM's adapter slots
  (``CapturedLayer``), sized for the targeted modules. The op ``tensafe::he_lora_delta_device``
  then reads nothing but persistent buffers, so vLLM may capture it in its graphs and replay it:

  - the token -> slot indices: ``TokenSlots``, a copy of vLLM's punica ``token_lora_indices``
    written in place every step, before the forward pass, by the hook on
    ``LoRAModelManager.set_adapter_mapping`` (where vLLM writes its own punica buffers); its
    entries past the batch are -1, so padded rows of a graph batch get no delta;
  - the adapters: the engine's tables, A', output index and loaded flags, written in place
    by ``bind``/``unbind`` when vLLM moves adapters in and out of slots (between steps, the way
    vLLM writes its stacked LoRA weights);
  - the flood's randomness: the device's default generator, which torch registers with every
    graph capture (a replay draws fresh values);
  - the counters: ``DeviceUsage``, added to in place and read between steps.

  Nothing in the op depends on host data: its Python runs once at capture and the recorded
  kernels are right for every later step (tests/gpu/test_cuda_graphs.py checks the answers).

* **eager** (remote key holder, the CPU, graphs off, no target modules). Each adapter slot of a
  layer gets an engine of its own when vLLM binds the adapter (``eager_engine``), sized by the
  adapter's own modules; the splitting op ``tensafe::he_lora_delta`` runs it every step,
  outside any graph, for the tokens of that slot.

Tensor parallelism: each engine computes the full module's ciphertexts and keeps the output
rows that vLLM's own ``slice_lora_b`` keeps for this rank (``shard_rows``), exactly as the
TenSEAL path slices its full-width deltas.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm_tensafe.errors import ConfigError, UnsupportedAdapterError
from vllm_tensafe.vllm.graph_safety import DEVICE_OP_NAME

if TYPE_CHECKING:
    from vllm_tensafe.he.gpu_engine import GpuDeltaEngine
    from vllm_tensafe.vllm.runtime import EncryptedAdapter, TenSafeRuntime

logger = logging.getLogger("vllm_tensafe.device_he")


# --- layer geometry ---------------------------------------------------------------------------


def module_names(manager: Any, name: str) -> list[str]:
    """The adapter-visible modules of LoRA layer ``name``, one per output slice."""
    return list(manager.packed_modules.get(name, [name]))


def targeted_slices(manager: Any, name: str, target_modules: Sequence[str] | None) -> list[bool]:
    """Which output slices of layer ``name`` vLLM's ``--lora-target-modules`` covers (all of
    them when unset, or when it names the packed layer itself, e.g. qkv_proj)."""
    subs = module_names(manager, name)
    if not target_modules:
        return [True] * len(subs)
    wanted = set(target_modules)
    if name in wanted or name.rsplit(".", 1)[-1] in wanted:
        return [True] * len(subs)
    return [sub in wanted or sub.rsplit(".", 1)[-1] in wanted for sub in subs]


def full_slice_sizes(layer: Any) -> list[int]:
    """Each output slice's full size (the module's d_out, all tensor-parallel ranks)."""
    local = [int(s) for s in layer.output_slices]
    if layer.tp_size == 1:
        return local
    base = layer.base_layer
    if layer.n_slices == 3 and hasattr(base, "total_num_kv_heads"):  # q, k, v of qkv_proj
        head = int(base.head_size)
        v_head = int(getattr(base, "v_head_size", head))
        kv = int(base.total_num_kv_heads)
        return [int(base.total_num_heads) * head, kv * head, kv * v_head]
    sizes = getattr(layer, "output_sizes", None)  # merged column layers: full per slice
    if sizes is not None and len(sizes) == layer.n_slices:
        return [int(s) for s in sizes]
    if layer.n_slices == 1:
        return [int(base.output_size)]
    raise ConfigError(
        f"{type(layer).__name__}: cannot tell the full sizes of its {layer.n_slices} output "
        "slices under tensor parallelism, which the torch HE engine needs",
        "set --tensafe-he-device seal (the TenSEAL engine slices full-width deltas instead)",
    )


def shard_rows(layer: Any, full_sizes: Sequence[int], targeted: Sequence[bool]) -> list[np.ndarray]:
    """Per output slice: the rows of the full module that this rank's output holds, in the
    order of its output columns, as vLLM's own ``slice_lora_b`` picks them for a plaintext B.
    Slices not targeted get 0..size-1 (their columns always get an exact zero)."""
    local = [int(s) for s in layer.output_slices]
    if layer.tp_size == 1:
        return [np.arange(size) for size in local]
    probes: list[torch.Tensor | None] = [
        torch.arange(full, dtype=torch.float64).unsqueeze(1) if flag else None
        for full, flag in zip(full_sizes, targeted, strict=True)
    ]
    sliced = layer.slice_lora_b(probes if layer.n_slices > 1 else probes[0])
    shards = sliced if isinstance(sliced, (list, tuple)) else [sliced]
    rows = []
    for s, size in enumerate(local):
        shard = shards[s]
        if shard is None:
            rows.append(np.arange(size))
            continue
        picked = shard[:size, 0].round().long().cpu().numpy()
        if picked.size != size:
            raise ConfigError(
                f"{type(layer).__name__}: slice_lora_b keeps {picked.size} rows of slice {s}, "
                f"the layer's output has {size}",
                "set --tensafe-he-device seal, or report the vLLM version",
            )
        rows.append(picked)
    return rows


def adapter_slices(manager: Any, name: str, adapter: EncryptedAdapter) -> list[Any]:
    """The adapter's encrypted B' per output slice of layer ``name`` (None: not targeted)."""
    return [adapter.matrices.get(sub) for sub in module_names(manager, name)]


def a_primes(layer: Any, slot: int, slices: Sequence[Any], rank: int) -> list[Any]:
    """A' per targeted slice, read from vLLM's stacked A (already sharded for tensor
    parallelism and in vLLM's LoRA dtype, as the plaintext path and the TenSEAL path use it)."""
    return [
        None if mat is None else layer.lora_a_stacked[s][slot, 0, :rank, :]
        for s, mat in enumerate(slices)
    ]


# --- per-step inputs and counters (persistent buffers) -------------------------------------


class TokenSlots:
    """A persistent copy of vLLM's token -> adapter slot indices for one punica wrapper.

    vLLM writes ``_token_lora_indices[:n]`` for the n tokens of a step and leaves older values
    past them; a CUDA graph batch is padded past n. This copy holds -1 ("no adapter") there, so
    padded rows get no delta and count as no adapter's tokens.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.buffer = torch.full((int(size),), -1, dtype=torch.int64, device=device)

    @property
    def size(self) -> int:
        return int(self.buffer.shape[0])

    def refresh(self, indices: torch.Tensor) -> None:
        n = min(int(indices.shape[0]), self.size)
        with torch.no_grad():
            self.buffer[:n].copy_(indices[:n])
            self.buffer[n:].fill_(-1)

    def for_tokens(self, tokens: int) -> torch.Tensor:
        if tokens > self.size:
            raise ConfigError(
                f"a forward pass of {tokens} tokens is longer than vLLM's "
                f"max_num_batched_tokens ({self.size}) the HE op was sized for",
                "report the vLLM version",
            )
        return self.buffer[:tokens]


class DeviceUsage:
    """Per adapter slot, on the device: HE calls (layer calls with at least one of the slot's
    tokens), tokens x modules, and ciphertexts (tokens x ciphertext groups). Added to inside
    the op (captured in graphs too); read and zeroed between steps (``take``)."""

    CALLS, TOKENS, CIPHERTEXTS = 0, 1, 2

    def __init__(self, slots: int, device: torch.device) -> None:
        self.counts = torch.zeros((int(slots), 3), dtype=torch.int64, device=device)
        self._ids = torch.arange(int(slots), device=device)

    def add(
        self,
        token_slots: torch.Tensor,
        loaded: torch.Tensor,
        modules: torch.Tensor,
        groups: torch.Tensor,
    ) -> None:
        hits = (token_slots.unsqueeze(1) == self._ids).sum(dim=0) * loaded  # (slots,)
        with torch.no_grad():
            self.counts[:, self.CALLS].add_((hits > 0).long())
            self.counts[:, self.TOKENS].add_(hits * modules)
            self.counts[:, self.CIPHERTEXTS].add_(hits * groups)

    def take(self) -> np.ndarray:
        """(slots, 3) counts since the last call (a host synchronisation: between steps)."""
        values = self.counts.cpu().numpy().copy()
        with torch.no_grad():
            self.counts.zero_()
        return values


# --- the captured path ------------------------------------------------------------------------


class CapturedLayer:
    """One LoRA layer's multi-slot local engine, built before vLLM captures its graphs."""

    def __init__(
        self, name: str, engine: GpuDeltaEngine, token_slots: TokenSlots, usage: DeviceUsage
    ) -> None:
        self.name = name
        self.engine = engine
        self.token_slots = token_slots
        self.usage = usage
        device = engine.device
        # Per slot: modules and ciphertext groups bound (for the counters).
        self.modules = torch.zeros(engine.max_slots, dtype=torch.int64, device=device)
        self.groups = torch.zeros(engine.max_slots, dtype=torch.int64, device=device)

    def bind(
        self, slot: int, slices: Sequence[Any], a_prime: Sequence[Any], adapter_id: str
    ) -> None:
        self.engine.load(slot, slices, a_prime, adapter_id=adapter_id)
        with torch.no_grad():
            self.modules[slot] = sum(m is not None for m in slices)
            self.groups[slot] = self.engine.groups_used(slot)

    def unbind(self, slot: int) -> None:
        self.engine.unload(slot)
        with torch.no_grad():
            self.modules[slot] = 0
            self.groups[slot] = 0

    def add_delta(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """The op's body: static shapes, persistent buffers, no host synchronisation."""
        engine = self.engine
        if output.shape[-1] != engine.out_features or x.shape[-1] != engine.d_in:
            raise ConfigError(
                f"{DEVICE_OP_NAME} (layer {self.name}): x {tuple(x.shape)} and output "
                f"{tuple(output.shape)} do not match the layer engine ({engine.d_in} in, "
                f"{engine.out_features} out)",
                "set --tensafe-he-device seal, or report the vLLM version",
            )
        slots = self.token_slots.for_tokens(x.shape[0])
        delta = engine.compute(x, slots)
        self.usage.add(slots, engine.loaded, self.modules, self.groups)
        output.add_(delta.to(output.dtype))


class DeviceState:
    """The device path's state in one worker: captured layers, token slot buffers, counters,
    and which adapter each slot holds (to credit the counters)."""

    def __init__(self, runtime: TenSafeRuntime, slots: int) -> None:
        self.runtime = runtime
        self.slots = int(slots)
        self.layers: dict[str, CapturedLayer] = {}
        self.token_slots: dict[int, tuple[Any, TokenSlots]] = {}  # id(punica) -> (punica, copy)
        self.usage: DeviceUsage | None = None
        self.slot_adapter: dict[int, EncryptedAdapter] = {}
        self.covered: set[str] = set()  # module names the captured engines serve
        self._rings: dict[tuple[str, str], Any] = {}
        self._local_context: Any = None
        runtime.usage_flushers.append(self.flush)

    def ring(self, ctx: Any, device: torch.device) -> Any:
        """One DeviceRing (primes, FFT and decoder constants) per key and device."""
        from vllm_tensafe.he.gpu_engine import DeviceRing

        key = (ctx.key_id, str(device))
        ring = self._rings.get(key)
        if ring is None:
            ring = DeviceRing(ctx, device)
            self._rings[key] = ring
        return ring

    def local_context(self) -> Any:
        """The local key holder's public context (made once)."""
        if self._local_context is None:
            self._local_context = self.runtime.local_secret().public_context()
        return self._local_context

    def token_slots_for(self, punica: Any, size: int, device: torch.device) -> TokenSlots:
        entry = self.token_slots.get(id(punica))
        if entry is None:
            entry = (punica, TokenSlots(size, device))
            self.token_slots[id(punica)] = entry
        return entry[1]

    def usage_on(self, device: torch.device) -> DeviceUsage:
        if self.usage is None:
            self.usage = DeviceUsage(self.slots, device)
        return self.usage

    def refresh_token_slots(self) -> None:
        """Copy vLLM's token -> slot indices (just written for this step) into the buffers."""
        for punica, copy in self.token_slots.values():
            if punica.indices_len[0] is None:  # never given a mapping (e.g. a vision tower)
                continue
            copy.refresh(punica.token_lora_indices)

    def flush(self) -> None:
        """Credit the device counters to the adapters that hold the slots now."""
        if self.usage is None or not self.slot_adapter:
            return
        counts = self.usage.take()
        for slot, adapter in list(self.slot_adapter.items()):
            calls, tokens, ciphertexts = (int(v) for v in counts[slot])
            if not calls:
                continue
            adapter.he_calls += calls
            adapter.decrypt_calls += calls  # the local key holder decrypts once per layer call
            adapter.tokens += tokens
            adapter.ciphertexts_sent += ciphertexts
            _record_metrics(adapter, ciphertexts)

    def assign(self, slot: int, adapter: EncryptedAdapter | None) -> None:
        """Slot ``slot`` holds ``adapter`` from now on (the counters so far go to the last one)."""
        self.flush()
        if adapter is None:
            self.slot_adapter.pop(slot, None)
        else:
            self.slot_adapter[slot] = adapter


def _record_metrics(adapter: EncryptedAdapter, ciphertexts: int) -> None:
    from vllm_tensafe import observability

    try:
        observability.record_he_operations(adapter.name, ciphertexts)
    except Exception:  # a metrics problem must never fail a slot change or a status read
        logger.debug("Could not record HE metrics", exc_info=True)


def compiles(runtime: TenSafeRuntime, device: torch.device) -> bool:
    """Whether a torch engine on ``device`` runs its stages compiled (TENSAFE_HE_COMPILE; CUDA
    only: on the CPU inductor would spend minutes in a C++ compiler for no launch savings)."""
    return runtime.settings.he_compile and device.type == "cuda"


def build_captured_layer(
    state: DeviceState,
    manager: Any,
    name: str,
    layer: Any,
    runtime: TenSafeRuntime,
    target_modules: Sequence[str] | None,
) -> CapturedLayer | None:
    """The captured engine of one LoRA layer (None: the deployment targets none of its slices)."""
    from vllm_tensafe.he.gpu_engine import GpuDeltaEngine, layer_groups_for

    targeted = targeted_slices(manager, name, target_modules)
    if not any(targeted):
        return None
    secret = runtime.local_secret()
    ctx = state.local_context()
    full = full_slice_sizes(layer)
    rows = shard_rows(layer, full, targeted)
    sizes = [
        f if flag else int(local)
        for f, flag, local in zip(full, targeted, layer.output_slices, strict=True)
    ]
    device = layer.lora_a_stacked[0].device
    lora_config = manager.lora_config
    engine = GpuDeltaEngine(
        secret,
        ctx,
        output_slices=sizes,
        groups=layer_groups_for(sizes, ctx.slot_count, targeted),
        d_in=int(layer.lora_a_stacked[0].shape[-1]),
        max_slots=state.slots,
        max_rank=int(lora_config.max_lora_rank),
        device=device,
        fold_secret=runtime.settings.he_fold_secret,
        compile=compiles(runtime, device),
        rows=rows,
        ring=state.ring(ctx, device),
        # torch registers the default generator with every CUDA graph capture (vLLM's too);
        # a dedicated one would have to be registered with vLLM's graphs, which TenSafe does
        # not create.
        generator="default",
    )
    punica = layer.punica_wrapper
    token_slots = state.token_slots_for(punica, manager.max_num_batched_tokens, device)
    captured = CapturedLayer(name, engine, token_slots, state.usage_on(device))
    state.layers[name] = captured
    subs = module_names(manager, name)
    state.covered.update(sub for sub, flag in zip(subs, targeted, strict=True) if flag)
    return captured


def captured_memory_bytes(state: DeviceState) -> int:
    total = 0
    for layer in state.layers.values():
        engine = layer.engine
        total += engine.table.numel() * engine.table.element_size()
        if engine.a_prime is not None:
            total += engine.a_prime.numel() * engine.a_prime.element_size()
    return total


# --- the eager path ----------------------------------------------------------------------------


def eager_engine(
    state: DeviceState, layer: Any, adapter: EncryptedAdapter, slices: Sequence[Any], slot: int
) -> GpuDeltaEngine:
    """An engine of one adapter's modules of one layer, in slot 0 of its own, on the device
    the plan names (the layer's device for CUDA)."""
    from vllm_tensafe.he.gpu_engine import GpuDeltaEngine, GpuRemoteDeltaEngine

    runtime = state.runtime
    plan = runtime.plan
    assert plan is not None and plan.engine == "torch"
    device = layer.lora_a_stacked[0].device if plan.device == "cuda" else torch.device("cpu")
    targeted = [m is not None for m in slices]
    local = [int(s) for s in layer.output_slices]
    sizes = [m.d_out if m is not None else local[s] for s, m in enumerate(slices)]
    rows = shard_rows(layer, sizes, targeted)
    kwargs: dict[str, Any] = {
        "output_slices": sizes,
        "rows": rows,
        "d_in": int(layer.lora_a_stacked[0].shape[-1]),
        "max_slots": 1,
        "max_rank": adapter.rank,
        "ring": state.ring(next(m for m in slices if m is not None).ctx, device),
    }
    a = [None if p is None else p.to(device) for p in a_primes(layer, slot, slices, adapter.rank)]
    if runtime.settings.key_holder == "local":
        engine = GpuDeltaEngine.from_matrices(
            runtime.local_secret(),
            slices,
            fold_secret=runtime.settings.he_fold_secret,
            compile=compiles(runtime, device),
            **kwargs,
        )
        engine.load(0, slices, a, adapter_id=adapter.name)
        return engine
    remote = GpuRemoteDeltaEngine.from_matrices(
        runtime.key_holder(),
        slices,
        compile=compiles(runtime, device),
        **kwargs,
    )
    remote.load(0, slices, a, adapter_id=adapter.name, ref=adapter.ref)
    return remote


def check_coverage(state: DeviceState, adapter_modules: Sequence[str], name: str) -> None:
    """Captured path: the layer engines were built for ``--lora-target-modules`` only, before
    vLLM captured its graphs; an adapter that targets any other module cannot be served."""
    outside = sorted(m for m in adapter_modules if m not in state.covered)
    if outside:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in outside})
        raise UnsupportedAdapterError(
            f"encrypted adapter {name!r} targets {', '.join(leaves)} (e.g. {outside[0]}), "
            "which --lora-target-modules leaves out: the GPU HE engines are built for those "
            "modules when vLLM starts, before it captures its CUDA graphs",
            "add the modules to --lora-target-modules, or set --tensafe-he-cuda-graphs false",
        )
