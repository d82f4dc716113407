"""HE-LoRA's torch ring arithmetic and device engines on CUDA (skipped without a GPU).

Reruns every check of tests/he/test_torch_ring.py on CUDA tensors (the ``device`` fixture is
overridden here), then the checks only a GPU can make: CUDA and CPU give the same integers bit
for bit, and the local-key-holder path captured in a CUDA graph replays correctly with its
inputs and adapter slots changed in place. Prints a timing line per shape and writes the
figures to $OUT/he_cuda.json when OUT is set.

    PYTHONPATH=$PWD python -m pytest tests/gpu/test_he_cuda.py -q -s
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA device", allow_module_level=True)

import tests.he.conftest as he_conftest
from tests.he.test_torch_ring import *  # noqa: F403  (the same tests, on CUDA)
from tests.he.test_torch_ring import _fused_qv, _reference, as_u64, on
from vllm_tensafe.he import PublicContext, SecretKeySet
from vllm_tensafe.he.gpu_engine import DeviceRing, GpuDeltaEngine, coefficient_residues
from vllm_tensafe.he.packing import encrypt_matrix
from vllm_tensafe.he.torch_ring import ProductTables, limb_plan

# tests/he/conftest.py's fixtures (keys, secret, ctx, other_keys, rng), which the imported tests
# need: a conftest applies to its own folder only.
globals().update(
    {name: getattr(he_conftest, name) for name in ("keys", "secret", "ctx", "other_keys", "rng")}
)

CUDA = torch.device("cuda")
RESULTS: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}


@pytest.fixture(scope="module")
def device() -> torch.device:  # overrides test_torch_ring's CPU fixture for the imported tests
    return CUDA


@pytest.fixture(scope="module", autouse=True)
def _write_results() -> object:
    yield
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "he_cuda.json").write_text(json.dumps(RESULTS, indent=2) + "\n")


def test_cuda_and_cpu_give_the_same_integers(
    ctx: PublicContext, secret: SecretKeySet, rng: np.random.Generator
) -> None:
    cpu, gpu = DeviceRing(ctx, "cpu"), DeviceRing(ctx, CUDA)
    cols = [c[0] for c in encrypt_matrix(ctx, rng.normal(size=(64, 16)) * 0.1).ciphertexts]
    residues = np.stack([coefficient_residues(ctx, c) for c in cols])
    weights = rng.integers(-(1 << 43), 1 << 43, size=(8, 16))
    out = []
    for ring in (cpu, gpu):
        tables = ProductTables(ring.arith, limb_plan(44, 16, 60))
        products = tables.combine(
            on(weights, ring.device), tables.build(on(residues, ring.device)), (2, *ring.shape)
        )
        plain = ring.decrypt(products, ring.secret_spectrum(secret))
        out.append([as_u64(products), as_u64(plain), as_u64(ring.switch(plain))])
    for a, b in zip(*out, strict=True):
        assert np.array_equal(a, b)


def _static_inputs(d_in: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.zeros((tokens, d_in), dtype=torch.bfloat16, device=CUDA),
        torch.full((tokens + 3,), -1, dtype=torch.int64, device=CUDA),
    )


def _capture(engine: GpuDeltaEngine, x: torch.Tensor, slots: torch.Tensor):
    """Capture engine.compute the way vLLM does: warm-up on a side stream, then a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            engine.compute(x, slots)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if engine.generator is not None:
        # A dedicated generator must be registered with the graph (torch >= 2.5).
        graph.register_generator_state(engine.generator)
    with torch.cuda.graph(graph):
        out = engine.compute(x, slots)
    return graph, out


@pytest.mark.parametrize("compiled", [False, True])
def test_local_engine_replays_in_a_cuda_graph(
    ctx: PublicContext, secret: SecretKeySet, rng: np.random.Generator, compiled: bool
) -> None:
    d_in, (lq, lv), (mq, mv) = _fused_qv(ctx, rng)
    engine = GpuDeltaEngine.from_matrices(
        secret, [mq, None, mv], output_slices=[96, 16, 32], d_in=d_in, max_slots=2, device=CUDA,
        compile=compiled,
    )  # fmt: skip
    assert engine.capturable
    x_buf, slot_buf = _static_inputs(d_in, 4)
    # Captured before any adapter is loaded (vLLM captures at startup): replays must still
    # see adapters loaded later, because the op reads persistent buffers.
    graph, out = _capture(engine, x_buf, slot_buf)
    engine.load(1, [mq, None, mv], [lq.a_mixed, None, lv.a_mixed])
    x = rng.normal(size=(4, d_in))
    x_buf.copy_(torch.from_numpy(x))
    slot_buf[:4] = torch.tensor([1, -1, 1, 0])
    graph.replay()
    first = out.cpu().numpy()
    xr = x_buf.float().cpu().numpy().astype(np.float64)
    ref = _reference(xr, lq, lv, [1, 3])
    assert np.all(first[[1, 3]] == 0.0)
    assert np.abs(first - ref).max() < ctx.profile.tolerance
    graph.replay()  # fresh flood every replay, same deltas within the tolerance
    second = out.cpu().numpy()
    assert not np.array_equal(first[0], second[0])
    assert np.abs(second - ref).max() < ctx.profile.tolerance
    # A second adapter loaded into slot 0 after capture is served by the same graph.
    engine.load(0, [mq, None, mv], [lq.a_mixed * 2.0, None, lv.a_mixed * 2.0])
    slot_buf[:4] = torch.tensor([0, 0, 1, -1])
    graph.replay()
    third = out.cpu().numpy()
    doubled = _reference(xr, lq, lv, [3])
    doubled[:2] *= 2.0
    assert np.abs(third - doubled).max() < 2 * ctx.profile.tolerance


@pytest.mark.parametrize("compiled", [False, True])
def test_long_call_replays_in_a_cuda_graph(
    ctx: PublicContext, secret: SecretKeySet, rng: np.random.Generator, compiled: bool
) -> None:
    """A batch longer than the engine's columns, captured before any adapter: warm-up and
    capture both take the decoded-columns path, and every replay decodes the columns of the
    adapters loaded since (the table is read at replay, not at capture)."""
    d_in, (lq, lv), (mq, mv) = _fused_qv(ctx, rng)
    engine = GpuDeltaEngine.from_matrices(
        secret, [mq, None, mv], output_slices=[96, 16, 32], d_in=d_in, max_slots=2, device=CUDA,
        compile=compiled,
    )  # fmt: skip
    tokens = engine.column_decode_tokens + 4
    assert engine._decodes_columns(tokens)
    x_buf, slot_buf = _static_inputs(d_in, tokens)
    graph, out = _capture(engine, x_buf, slot_buf)
    engine.load(1, [mq, None, mv], [lq.a_mixed, None, lv.a_mixed])
    x = rng.normal(size=(tokens, d_in))
    x_buf.copy_(torch.from_numpy(x))
    token_slots = np.where(np.arange(tokens) % 6 == 1, -1, 1)
    slot_buf[:tokens] = torch.from_numpy(token_slots)
    graph.replay()
    got = out.cpu().numpy()
    xr = x_buf.float().cpu().numpy().astype(np.float64)
    zero = [t for t in range(tokens) if token_slots[t] != 1]
    ref = _reference(xr, lq, lv, zero)
    assert np.all(got[zero] == 0.0)
    assert np.abs(got - ref).max() < ctx.profile.tolerance
    graph.replay()  # the flood is drawn again at every replay, not recorded once
    again = out.cpu().numpy()
    assert not np.array_equal(again, got)
    assert np.abs(again - ref).max() < ctx.profile.tolerance
    engine.unload(1)
    graph.replay()
    assert np.all(out.cpu().numpy() == 0.0)  # unloaded after capture: zero, not stale


def _time(fn, repeats: int = 20) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000.0


def test_timing_llama8b_qv_layer(ctx: PublicContext, secret: SecretKeySet) -> None:
    """One Llama-3-8B attention layer (q 4096 and v 1024 rows, r 16, d_in 4096): ms per call,
    eager and replayed from a CUDA graph, with B' encrypted on the device (decrypted per token,
    the default) and folded (Dec(B') held). Printed and written to $OUT; nothing asserted."""
    rng = np.random.default_rng(3)
    mq = encrypt_matrix(ctx, rng.normal(size=(4096, 16)) * 0.01)
    mv = encrypt_matrix(ctx, rng.normal(size=(1024, 16)) * 0.01)
    a = [rng.normal(size=(16, 4096)) * 0.01, None, rng.normal(size=(16, 4096)) * 0.01]
    timings: dict[str, dict[int, dict[str, float]]] = {}
    for fold in (False, True):
        engine = GpuDeltaEngine.from_matrices(
            secret, [mq, None, mv], output_slices=[4096, 1024, 1024], d_in=4096, device=CUDA,
            fold_secret=fold,
        )  # fmt: skip
        engine.load(0, [mq, None, mv], a)
        label = "folded" if fold else "encrypted"
        timings[label] = {}
        for tokens in (1, 16, 64):
            x_buf, slot_buf = _static_inputs(4096, tokens)
            x_buf.normal_()
            slot_buf[:tokens] = 0
            call = engine.compute
            eager = _time(lambda call=call, x_buf=x_buf, slot_buf=slot_buf: call(x_buf, slot_buf))
            graph, _ = _capture(engine, x_buf, slot_buf)
            replay = _time(graph.replay)
            timings[label][tokens] = {"eager_ms": round(eager, 3), "graph_ms": round(replay, 3)}
            print(f"[he-cuda] llama8b q+v layer, B' {label}, T={tokens}: eager {eager:.3f} ms, "
                  f"graph {replay:.3f} ms")  # fmt: skip
        del engine
        torch.cuda.empty_cache()
    RESULTS["llama8b_qv_layer_ms"] = timings
