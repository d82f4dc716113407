"""The captured path of the device HE op inside a real CUDA graph (seconds, no server).

tests/test_device_layers.py's fakes of vLLM's LoRA layer and manager, on CUDA: the op is
captured the way vLLM captures it at startup (warm-up on a side stream, then
``torch.cuda.graph``), with NO adapter bound; adapters are bound and the token -> slot indices
written only afterwards, and every replay must add exactly this step's deltas: the slot's
adapter for its tokens, nothing for -1, empty slots and padded rows, a fresh flood each time.

    PYTHONPATH=$PWD python -m pytest tests/gpu/test_device_layers_cuda.py -q
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA device", allow_module_level=True)

import tests.test_device_layers as cpu_tests
from tests.test_device_layers import D_IN, SIZES, activate_pair, build, reference, tolerance
from vllm_tensafe.vllm.runtime import HEPlan

# The CPU module's fixtures (keys, packed adapters, the failure board), used here on CUDA.
globals().update({name: getattr(cpu_tests, name) for name in ("keys", "qv", "qkv", "board")})

CUDA_CAPTURED = HEPlan("torch", "cuda", True, "test: the captured path on CUDA")
TOKENS = 8  # the graph's batch size; steps use fewer, the rest is padding


def _capture(call: Any) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # registers the default generator (the flood's) itself
        call()
    return graph


def test_captured_before_any_adapter_replays_every_later_step(
    keys: tuple, qv: Any, qkv: Any, board: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager, layer, punica, rt = build(CUDA_CAPTURED, keys, monkeypatch, device="cuda")
    name = layer._tensafe_name
    x = torch.zeros(TOKENS, D_IN, device="cuda")
    out = torch.zeros(TOKENS, sum(SIZES), device="cuda")
    manager.step(punica, [0] * TOKENS)
    graph = _capture(lambda: torch.ops.tensafe.he_lora_delta_device(x, out, name))

    a, b = activate_pair(manager, keys, CUDA_CAPTURED, qv, qkv)  # after capture
    rng = np.random.default_rng(11)
    xs = rng.normal(size=(TOKENS, D_IN))
    x.copy_(torch.from_numpy(xs))
    manager.step(punica, [1] * TOKENS)
    slots = [1, -1, 0, 1, 0, -1]  # 6 tokens this step: rows 6 and 7 are padding
    manager.step(punica, slots)

    def replay() -> np.ndarray:
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        return out.cpu().numpy().astype(np.float64)

    ref = reference(xs, slots, {1: qv, 0: qkv})
    first = replay()
    assert np.all(first[[1, 5, 6, 7]] == 0.0)
    assert np.abs(first - ref).max() < tolerance(keys[1], ref)
    second = replay()
    assert not np.array_equal(first[0], second[0])  # a fresh flood every replay
    assert np.abs(second - ref).max() < tolerance(keys[1], ref)

    # vLLM moves adapters: qv leaves slot 1, qkv is bound there too; same graph.
    manager.deactivate(1)
    manager.activate(3, 1, b, {k: v.a_mixed for k, v in qkv.loras.items()})
    manager.step(punica, [1, 0, -1])
    moved = replay()
    ref = reference(xs, [1, 0, -1], {1: qkv, 0: qkv})
    assert np.all(moved[2:] == 0.0)
    assert np.abs(moved - ref).max() < tolerance(keys[1], ref)

    # The counters were added to inside the graph: every replay above, nothing for padding.
    rt.flush_usage()
    assert a.he_calls == 2 and a.tokens == 2 * 2 * 2  # two replays x 2 tokens x q, v
    assert b.he_calls == 4  # slot 0 in all three replays, slot 1 in the third
