"""The torch HE engine wired into vLLM's LoRA layers (layers.py, device_he.py), on CPU tensors.

vLLM's LoRA layer and model manager are stood in for by small fakes with the same attributes
(stacked A per slice, punica's token -> slot indices, packed sub-modules, slice_lora_b with
vLLM's merged-column sharding), so every path runs here in seconds: the captured path (one
engine per layer for every slot, persistent buffers), the eager path (one engine per slot) and
the TenSEAL path must add the same deltas to the same output rows, for fused q/k/v layers,
modules wider than the slots, tensor-parallel shards and the -1 slot. tests/gpu/ runs the
captured path inside a real CUDA graph; tests/e2e/test_serve_torch_engine.py inside vLLM.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.he.helpers import Lora, make_lora
from vllm_tensafe.errors import UnsupportedAdapterError
from vllm_tensafe.he import DeltaEngine, PublicContext, SecretKeySet, generate_keys
from vllm_tensafe.he.packing import encrypt_matrix, fused_layouts
from vllm_tensafe.keyholder import LocalKeyHolder
from vllm_tensafe.settings import TenSafeSettings
from vllm_tensafe.vllm import device_he, failures, layers, runtime
from vllm_tensafe.vllm.runtime import EncryptedAdapter, HEPlan, TenSafeRuntime

D_IN = 48
SLOTS = 2
MAX_RANK = 8
MAX_TOKENS = 16
LAYER = "model.layers.0.self_attn.qkv_proj"
SUBS = [f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]
SIZES = [64, 32, 32]


# --- fakes of vLLM's LoRA layer and manager ------------------------------------------------


class FakePunica:
    """punica's token -> slot indices: a persistent buffer and the length of this step."""

    def __init__(self, size: int, device: str = "cpu") -> None:
        # Earlier steps' slots: vLLM leaves them past the tokens of the current step.
        self._token_lora_indices = torch.full((size,), 1, dtype=torch.long, device=device)
        self.indices_len: list[int | None] = [None] * 4

    def set(self, slots: list[int]) -> None:
        self._token_lora_indices[: len(slots)] = torch.tensor(slots)
        self.indices_len[0] = len(slots)

    @property
    def token_lora_indices(self) -> torch.Tensor:
        return self._token_lora_indices[: self.indices_len[0]]


class FakeLayer:
    """A merged column-parallel LoRA layer (vLLM's MergedColumnParallelLinearWithLoRA
    sharding: slice i keeps rows [size * rank, size * (rank + 1)) of its module)."""

    def __init__(
        self,
        full: list[int],
        punica: FakePunica,
        *,
        tp_size: int = 1,
        tp_rank: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.output_sizes = list(full)
        self.output_slices = tuple(size // tp_size for size in full)
        self.n_slices = len(full)
        self.tp_size, self.tp_rank = tp_size, tp_rank
        device = punica._token_lora_indices.device
        self.lora_a_stacked = tuple(
            torch.zeros(SLOTS, 1, MAX_RANK, D_IN, dtype=dtype, device=device) for _ in full
        )
        self.punica_wrapper = punica
        self.base_layer = types.SimpleNamespace(output_size=sum(full))

    def slice_lora_b(self, lora_b: Any) -> Any:
        if not isinstance(lora_b, list):
            size = self.output_slices[0]
            return lora_b[size * self.tp_rank : size * (self.tp_rank + 1)]
        return [
            None if b is None else b[size * self.tp_rank : size * (self.tp_rank + 1)]
            for b, size in zip(lora_b, self.output_slices, strict=True)
        ]


class FakeManager:
    def __init__(
        self,
        modules: dict[str, FakeLayer],
        packed: dict[str, list[str]],
        targets: Any,
        device: str = "cpu",
    ) -> None:
        self.modules = modules
        self.packed_modules = packed
        self.lora_index_to_id: list[int | None] = [None] * SLOTS
        self.lora_config = types.SimpleNamespace(
            max_lora_rank=MAX_RANK, target_modules=targets, max_loras=SLOTS
        )
        self.device = device
        self.max_num_batched_tokens = MAX_TOKENS
        self._registered_adapters: dict[int, Any] = {}

    def activate(self, lora_id: int, slot: int, adapter: EncryptedAdapter | None, a: dict) -> None:
        """What vLLM's activate_adapter does, then TenSafe's hook."""
        self.lora_index_to_id[slot] = lora_id
        self._registered_adapters[lora_id] = types.SimpleNamespace(tensafe_adapter=adapter)
        if adapter is not None:  # the loader registers every adapter it opened
            runtime.get_runtime().adapters[lora_id] = adapter
        for name, layer in self.modules.items():
            for s, sub in enumerate(self.packed_modules.get(name, [name])):
                stacked = layer.lora_a_stacked[s][slot, 0]
                stacked.zero_()
                if sub in a:
                    stacked[: a[sub].shape[0]] = torch.from_numpy(a[sub]).to(stacked.dtype)
        layers._bind_slot(self, lora_id)

    def deactivate(self, lora_id: int) -> None:
        layers._clear_slot(self, self.lora_index_to_id.index(lora_id))
        self.lora_index_to_id[self.lora_index_to_id.index(lora_id)] = None

    def step(self, punica: FakePunica, slots: list[int]) -> None:
        """vLLM writes its punica buffers, then set_adapter_mapping's hook runs."""
        punica.set(slots)
        layers._after_mapping(self, types.SimpleNamespace(index_mapping=tuple(slots)))


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> tuple[SecretKeySet, PublicContext]:
    return generate_keys("default")


@dataclass
class Packed:
    loras: dict[str, Lora]
    matrices: dict[str, Any]


def pack(
    ctx: PublicContext, rng: np.random.Generator, modules: dict[str, int], rank: int
) -> Packed:
    """Modules (full name -> d_out) of one layer, packed as ``vllm-tensafe pack`` does."""
    layout = fused_layouts([list(modules.items())], ctx.slot_count)
    loras, matrices = {}, {}
    for name, d_out in modules.items():
        lora = make_lora(rng, d_out, rank, rslora=False, d_in=D_IN)
        offset, width = layout[name]
        loras[name] = lora
        matrices[name] = encrypt_matrix(ctx, lora.b_mixed, slot_offset=offset, tile_width=width)
    return Packed(loras, matrices)


@pytest.fixture(scope="module")
def qv(keys: tuple) -> Packed:
    return pack(keys[1], np.random.default_rng(1), {SUBS[0]: 64, SUBS[2]: 32}, rank=4)


@pytest.fixture(scope="module")
def qkv(keys: tuple) -> Packed:
    return pack(keys[1], np.random.default_rng(2), dict(zip(SUBS, SIZES, strict=True)), rank=8)


@pytest.fixture
def board(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv(failures.RUN_DIR_ENV, str(tmp_path / "run"))
    monkeypatch.setattr(failures, "_board", None)
    yield failures.get_board()


def make_runtime(
    secret: SecretKeySet, plan: HEPlan, monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> TenSafeRuntime:
    rt = TenSafeRuntime(TenSafeSettings(he_device=plan.device, **settings))
    rt.plan = plan
    rt._secret = secret
    monkeypatch.setattr(runtime, "_runtime", rt)
    return rt


def adapter_for(
    packed: Packed, lora_id: int, name: str, ctx: PublicContext, engine: Any, label: str
) -> EncryptedAdapter:
    return EncryptedAdapter(
        lora_int_id=lora_id,
        name=name,
        path=f"/{name}.tssp",
        signer_key_id=None,
        manifest_digest="0" * 64,
        rank=next(iter(packed.loras.values())).a_mixed.shape[0],
        matrices=dict(packed.matrices),
        engine=engine,
        key_id=ctx.key_id,
        he_engine=label,
    )


CAPTURED = HEPlan("torch", "cpu", True, "test: the captured path on CPU tensors")
EAGER = HEPlan("torch", "cpu", False, "test")
SEAL = HEPlan("seal", "cpu", False, "test")


def build(
    plan: HEPlan,
    keys: tuple,
    monkeypatch: pytest.MonkeyPatch,
    *,
    full: list[int] | None = None,
    subs: list[str] | None = None,
    name: str = LAYER,
    targets: Any = ("q_proj", "k_proj", "v_proj"),
    tp_size: int = 1,
    tp_rank: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[FakeManager, FakeLayer, FakePunica, TenSafeRuntime]:
    rt = make_runtime(keys[0], plan, monkeypatch)
    punica = FakePunica(MAX_TOKENS, device)
    layer = FakeLayer(full or SIZES, punica, tp_size=tp_size, tp_rank=tp_rank, dtype=dtype)
    subs = subs or SUBS
    packed = {name: subs} if len(subs) > 1 else {}
    manager = FakeManager({name: layer}, packed, targets, device)
    layers._wrap_create(lambda self: None, FakeLayer)(manager)
    return manager, layer, punica, rt


def activate_pair(
    manager: FakeManager, keys: tuple, plan: HEPlan, qv: Packed, qkv: Packed
) -> tuple[EncryptedAdapter, EncryptedAdapter]:
    ctx = keys[1]
    engine = DeltaEngine(ctx, LocalKeyHolder(keys[0])) if plan.engine == "seal" else None
    a = adapter_for(qv, 1, "qv", ctx, engine, plan.label)
    b = adapter_for(qkv, 2, "qkv", ctx, engine, plan.label)
    manager.activate(1, 1, a, {k: v.a_mixed for k, v in qv.loras.items()})
    manager.activate(2, 0, b, {k: v.a_mixed for k, v in qkv.loras.items()})
    return a, b


def reference(
    x: np.ndarray, slots: list[int], per_slot: dict[int, Packed], sizes: list[int] = SIZES
) -> np.ndarray:
    """Full-width float64 deltas: rows of slot s get s's adapter; -1, empty slots and rows past
    the batch get zero."""
    xr = x.astype(np.float32).astype(np.float64)
    out = np.zeros((len(x), sum(sizes)))
    edges = np.cumsum([0, *sizes])
    for t, slot in enumerate(slots):
        packed = per_slot.get(slot)
        if packed is None:
            continue
        for i, sub in enumerate(SUBS):
            if sub in packed.loras:
                out[t, edges[i] : edges[i + 1]] = packed.loras[sub].delta(xr[t : t + 1])[0]
    return out


def run_op(layer: FakeLayer, x: torch.Tensor) -> np.ndarray:
    out = torch.zeros(x.shape[0], sum(layer.output_slices), dtype=torch.float32)
    if getattr(layer, "_tensafe_op", None) == layers.DEVICE:
        torch.ops.tensafe.he_lora_delta_device(x, out, layer._tensafe_name)
    else:
        torch.ops.tensafe.he_lora_delta(x, out, layer._tensafe_name)
    return out.numpy().astype(np.float64)


def tolerance(ctx: PublicContext, ref: np.ndarray) -> float:
    # As tests/he: the stated tolerance for |delta| <= 8, growing with |delta| beyond.
    return ctx.profile.tolerance * max(1.0, float(np.abs(ref).max()) / 8)


# --- the three paths agree ----------------------------------------------------------------------


@pytest.mark.parametrize("plan", [CAPTURED, EAGER, SEAL], ids=["captured", "eager", "seal"])
def test_every_path_adds_the_same_deltas(
    plan: HEPlan, keys: tuple, qv: Packed, qkv: Packed, board: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    manager, layer, punica, _ = build(plan, keys, monkeypatch)
    assert layer._tensafe_op == (layers.DEVICE if plan.captured else layers.SPLIT)
    activate_pair(manager, keys, plan, qv, qkv)
    rng = np.random.default_rng(5)
    manager.step(punica, [1] * 8)  # an earlier, longer step leaves its slots past the next one
    slots = [1, -1, 0, 1, 0, -1]
    manager.step(punica, slots)
    x = rng.normal(size=(8, D_IN))  # 2 rows past the batch: a padded graph batch
    got = run_op(layer, torch.from_numpy(x).float())
    ref = reference(x, slots, {1: qv, 0: qkv})
    assert np.all(got[[1, 5, 6, 7]] == 0.0)  # -1 and padding: exactly nothing
    assert np.abs(got - ref).max() < tolerance(keys[1], ref)


def test_captured_layer_engine_is_built_before_any_adapter(
    keys: tuple, monkeypatch: pytest.MonkeyPatch, board: Any
) -> None:
    manager, layer, punica, _ = build(CAPTURED, keys, monkeypatch, targets=["q_proj", "v_proj"])
    captured = layer._tensafe_captured
    engine = captured.engine
    # The groups pack gives q + v (k untargeted), all slots, vLLM's max rank; B' encrypted.
    assert engine.max_slots == SLOTS and engine.max_rank == MAX_RANK and not engine.fold_secret
    assert [[(m.slice, m.chunk) for m in g] for g in engine.groups] == [[(0, 0), (2, 0)]]
    assert manager._tensafe_device.covered == {SUBS[0], SUBS[2]}
    # Before any adapter: an exact zero, whatever the slots say.
    manager.step(punica, [0, 1, 1])
    assert not run_op(layer, torch.randn(3, D_IN)).any()


def test_rebinding_a_slot_serves_the_new_adapter(
    keys: tuple, qv: Packed, qkv: Packed, board: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, layer, punica, _ = build(CAPTURED, keys, monkeypatch)
    _, b = activate_pair(manager, keys, CAPTURED, qv, qkv)
    x = np.random.default_rng(9).normal(size=(4, D_IN))
    manager.step(punica, [1, 1, 0, 0])
    first = run_op(layer, torch.from_numpy(x).float())
    manager.deactivate(1)  # vLLM evicts qv from slot 1
    manager.step(punica, [1, 1, 0, 0])  # a stale mapping still naming slot 1: nothing there
    emptied = run_op(layer, torch.from_numpy(x).float())
    assert not emptied[:2].any()
    assert np.abs(emptied[2:] - first[2:]).max() < 2 * tolerance(keys[1], first)
    # qkv moves into slot 1 as well (another id): slot 1 now adds qkv's delta.
    manager.activate(3, 1, b, {k: v.a_mixed for k, v in qkv.loras.items()})
    moved = run_op(layer, torch.from_numpy(x).float())
    ref = reference(x, [1, 1, 0, 0], {1: qkv, 0: qkv})
    assert np.abs(moved - ref).max() < tolerance(keys[1], ref)


@pytest.mark.parametrize("plan", [CAPTURED, EAGER, SEAL], ids=["captured", "eager", "seal"])
def test_tensor_parallel_shards_follow_slice_lora_b(
    plan: HEPlan, keys: tuple, qv: Packed, qkv: Packed, board: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    manager, layer, punica, _ = build(plan, keys, monkeypatch, tp_size=2, tp_rank=1)
    activate_pair(manager, keys, plan, qv, qkv)
    slots = [0, 1, -1]
    manager.step(punica, slots)
    x = np.random.default_rng(3).normal(size=(3, D_IN))
    got = run_op(layer, torch.from_numpy(x).float())
    full = reference(x, slots, {1: qv, 0: qkv})
    # Rank 1 of 2 holds the second half of each of q, k and v.
    halves = np.concatenate([np.arange(32, 64), 64 + np.arange(16, 32), 96 + np.arange(16, 32)])
    ref = full[:, halves]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < tolerance(keys[1], ref)


@pytest.mark.parametrize("plan", [CAPTURED, EAGER, SEAL], ids=["captured", "eager", "seal"])
def test_a_module_wider_than_the_slots(
    plan: HEPlan, keys: tuple, board: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = keys[1]
    name = "model.layers.0.mlp.down_proj"
    d_out = ctx.slot_count + 36  # two row chunks, one ciphertext each per token
    packed = pack(ctx, np.random.default_rng(4), {name: d_out}, rank=2)
    manager, layer, punica, _ = build(
        plan, keys, monkeypatch, full=[d_out], subs=[name], name=name, targets=["down_proj"]
    )
    if plan.captured:
        assert len(layer._tensafe_captured.engine.groups) == 2
    engine = DeltaEngine(ctx, LocalKeyHolder(keys[0])) if plan.engine == "seal" else None
    adapter = adapter_for(packed, 1, "wide", ctx, engine, plan.label)
    manager.activate(1, 0, adapter, {name: packed.loras[name].a_mixed})
    manager.step(punica, [0, -1])
    x = np.random.default_rng(6).normal(size=(2, D_IN))
    got = run_op(layer, torch.from_numpy(x).float())
    ref = packed.loras[name].delta(x.astype(np.float32).astype(np.float64))
    ref[1] = 0.0
    assert np.abs(got - ref).max() < tolerance(ctx, ref)


# --- the captured path reads persistent buffers only -------------------------------------------

# aten ops that read device values back to the host (a synchronisation, which a CUDA graph
# cannot hold) or make shapes depend on data (which a replay cannot follow).
HOST_READS = {
    "_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "is_nonzero", "equal", "item", "bincount", "repeat_interleave",
}  # fmt: skip


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def test_the_captured_op_reads_nothing_back_to_the_host(
    keys: tuple, qv: Packed, qkv: Packed, board: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a CUDA graph replay needs: no host read of device values, no data-dependent shape.
    Guard: the eager path (which must stay a splitting op) does read back, and the check sees it.
    """
    manager, layer, punica, _ = build(CAPTURED, keys, monkeypatch)
    activate_pair(manager, keys, CAPTURED, qv, qkv)
    manager.step(punica, [1, 0, -1, 1])
    x = torch.randn(6, D_IN)
    out = torch.zeros(6, sum(layer.output_slices))
    with RecordOps() as recorded:
        layer._tensafe_captured.add_delta(x, out)
    assert recorded.ops and not (recorded.ops & HOST_READS), recorded.ops & HOST_READS

    eager_manager, eager_layer, eager_punica, _ = build(EAGER, keys, monkeypatch)
    activate_pair(eager_manager, keys, EAGER, qv, qkv)
    eager_manager.step(eager_punica, [1, 0, -1, 1])
    with RecordOps() as eager_ops:
        layers.add_layer_delta(eager_layer, x, torch.zeros_like(out))
    assert eager_ops.ops & HOST_READS


def test_token_slots_past_the_batch_are_no_adapter(
    keys: tuple, monkeypatch: pytest.MonkeyPatch, board: Any
) -> None:
    manager, layer, punica, _ = build(CAPTURED, keys, monkeypatch)
    copy = layer._tensafe_captured.token_slots
    manager.step(punica, [1, 0, 1])
    assert copy.buffer.tolist() == [1, 0, 1] + [-1] * (MAX_TOKENS - 3)
    assert punica._token_lora_indices[3:].eq(1).all()  # vLLM's own buffer keeps old values
    manager.step(punica, [0])
    assert copy.buffer.tolist() == [0] + [-1] * (MAX_TOKENS - 1)
    with pytest.raises(Exception, match="max_num_batched_tokens"):
        copy.for_tokens(MAX_TOKENS + 1)


def test_device_counters_credit_each_slots_adapter(
    keys: tuple, qv: Packed, qkv: Packed, board: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, layer, punica, rt = build(CAPTURED, keys, monkeypatch)
    a, b = activate_pair(manager, keys, CAPTURED, qv, qkv)
    manager.step(punica, [1, 1, 1, 0])
    run_op(layer, torch.randn(6, D_IN))  # 2 padded rows: counted for nobody
    manager.step(punica, [-1, -1])
    run_op(layer, torch.randn(2, D_IN))  # nobody's tokens: no call counted
    rt.flush_usage()
    # One layer call with qv's 3 tokens (2 modules, 1 ciphertext group), one with qkv's token.
    assert (a.he_calls, a.tokens, a.ciphertexts_sent, a.decrypt_calls) == (1, 6, 3, 1)
    assert (b.he_calls, b.tokens, b.ciphertexts_sent) == (1, 3, 1)
    manager.deactivate(1)  # counts so far stay with qv; slot 1 counts for nobody now
    manager.step(punica, [1, 0])
    run_op(layer, torch.randn(2, D_IN))
    rt.flush_usage()
    assert a.he_calls == 1 and b.he_calls == 2


# --- what cannot be served fails its requests, every step ---------------------------------------


def test_an_adapter_that_cannot_be_bound_fails_its_requests_each_step(
    keys: tuple, qv: Packed, board: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_tensafe.errors import ForeignCiphertextError

    manager, layer, punica, _ = build(CAPTURED, keys, monkeypatch)
    adapter = adapter_for(qv, 1, "foreign", keys[1], None, CAPTURED.label)
    adapter.bind_error = ForeignCiphertextError("ciphertexts declare key x", "route it")
    manager.activate(1, 0, adapter, {k: v.a_mixed for k, v in qv.loras.items()})
    assert not layer._tensafe_captured.engine.loaded.any()  # nothing of it on the device
    for _ in range(2):
        manager.step(punica, [1, 1, 0])
        taken = board.take_adapter_failures()
        assert taken[1]["error"] == "ForeignCiphertextError"
    manager.step(punica, [0, 0])  # not in the batch: nothing recorded
    assert board.take_adapter_failures() == {}
    assert not run_op(layer, torch.randn(3, D_IN)).any()


def test_a_module_outside_the_target_modules_is_refused_at_load(
    keys: tuple, qkv: Packed, board: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, _, _, _ = build(CAPTURED, keys, monkeypatch, targets=["q_proj", "v_proj"])
    with pytest.raises(UnsupportedAdapterError, match=r"k_proj.*--lora-target-modules"):
        device_he.check_coverage(manager._tensafe_device, list(qkv.matrices), "qkv")


def test_full_sizes_and_rows_under_tensor_parallelism() -> None:
    punica = FakePunica(4)
    layer = FakeLayer([8, 4, 4], punica, tp_size=2, tp_rank=1)
    assert device_he.full_slice_sizes(layer) == [8, 4, 4]
    rows = device_he.shard_rows(layer, [8, 4, 4], [True, False, True])
    assert [r.tolist() for r in rows] == [[4, 5, 6, 7], [0, 1], [2, 3]]
    qkv = FakeLayer([8, 4, 4], punica, tp_size=2)
    qkv.base_layer = types.SimpleNamespace(
        total_num_heads=4, total_num_kv_heads=2, head_size=2, output_size=16
    )
    assert device_he.full_slice_sizes(qkv) == [8, 4, 4]
