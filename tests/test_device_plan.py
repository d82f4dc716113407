"""Which engine computes the HE deltas (runtime.plan_he), and what the graph guard makes of it.

The captured path (the HE op inside vLLM's CUDA graphs) is chosen only where it is safe: the
local key holder, the torch engine on CUDA, engines sizable before vLLM captures
(--lora-target-modules) and TENSAFE_HE_CUDA_GRAPHS on. Everywhere else the op stays a splitting
op and vLLM's FULL graphs are turned off, as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.settings import TenSafeSettings
from vllm_tensafe.vllm import graph_safety
from vllm_tensafe.vllm.graph_safety import DEVICE_OP_NAME, OP_NAME
from vllm_tensafe.vllm.runtime import HEPlan, plan_he

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "owner.secret"
    path.write_text("x")
    return path


def settings(**values: Any) -> TenSafeSettings:
    return TenSafeSettings(**values)


# --- the choice ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "model", "engine", "where"),
    [
        ("auto", "cuda", "torch", "cuda"),
        ("auto", "cpu", "seal", "cpu"),
        ("auto", "xpu", "seal", "cpu"),  # a platform the torch engine is not wired for
        ("seal", "cuda", "seal", "cpu"),
        ("cpu", "cuda", "torch", "cpu"),
        ("cpu", "cpu", "torch", "cpu"),
        ("cuda", "cuda", "torch", "cuda"),
    ],
)
def test_the_engine_follows_the_setting_and_the_models_device(
    device: str, model: str, engine: str, where: str
) -> None:
    plan = plan_he(settings(he_device=device), model, TARGETS)
    assert (plan.engine, plan.device) == (engine, where)
    assert plan.label == ("seal" if engine == "seal" else f"torch-{where}")


def test_cuda_is_refused_where_the_model_is_not_on_cuda() -> None:
    with pytest.raises(ConfigError) as info:
        plan_he(settings(he_device="cuda"), "cpu", TARGETS)
    assert "the model runs on 'cpu'" in str(info.value)
    assert "--tensafe-he-device auto" in str(info.value)


def test_captured_only_where_every_condition_holds() -> None:
    local = {"he_device": "auto", "key_holder": "local"}
    assert plan_he(settings(**local), "cuda", TARGETS).captured
    cases = {
        "remote key holder": (
            settings(
                he_device="auto", key_holder="remote", key_holder_url="https://kh.example:8443"
            ),
            "cuda",
            TARGETS,
        ),
        "graphs off": (settings(**local, he_cuda_graphs=False), "cuda", TARGETS),
        "no target modules": (settings(**local), "cuda", None),
        "empty target modules": (settings(**local), "cuda", []),
        "torch on the CPU": (settings(he_device="cpu"), "cuda", TARGETS),
        "TenSEAL": (settings(he_device="seal"), "cuda", TARGETS),
        "not CUDA": (settings(**local), "cpu", TARGETS),
    }
    for why, (values, model, targets) in cases.items():
        plan = plan_he(values, model, targets)
        assert not plan.captured, why
        assert plan.why, why
    # The log says what to do about the missing target modules.
    plan = plan_he(settings(**local), "cuda", None)
    assert "--lora-target-modules" in plan.describe() and "outside CUDA graphs" in plan.describe()


# --- the graph guard ------------------------------------------------------------------------------

pytest.importorskip("vllm.config")
from vllm.config.compilation import CUDAGraphMode  # noqa: E402

from tests.test_graph_safety import gpu_config  # noqa: E402

CAPTURED = HEPlan("torch", "cuda", True, "test")
SPLIT = HEPlan("torch", "cuda", False, "test: remote key holder")


@pytest.fixture(autouse=True)
def _vllm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (graph_safety.DUAL_STREAM_ENV, graph_safety.BREAKABLE_ENV):
        monkeypatch.delenv(name, raising=False)


def test_captured_plan_keeps_vllms_default_graphs(
    base_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    before = list(config.compilation_config.splitting_ops)
    with caplog.at_level(logging.INFO, logger="vllm_tensafe"):
        decision = graph_safety.secure_vllm_config(config, "unset", plan=CAPTURED)
    cc = config.compilation_config
    assert cc.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    assert cc.splitting_ops == before and not decision.split_added
    assert decision.captured and decision.final == "FULL_AND_PIECEWISE"
    assert config.additional_config["tensafe"]["op"] == DEVICE_OP_NAME
    assert f"{DEVICE_OP_NAME} runs inside the CUDA graphs" in caplog.text
    graph_safety.verify_worker_config(config, captured=True)


def test_split_plan_still_turns_full_graphs_off(base_config: Any) -> None:
    """Guard for the above: without the captured path the old protection holds."""
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    decision = graph_safety.secure_vllm_config(config, "unset", plan=SPLIT)
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert OP_NAME in config.compilation_config.splitting_ops and not decision.captured
    assert config.additional_config["tensafe"]["op"] == OP_NAME
    graph_safety.verify_worker_config(config, captured=False)


@pytest.mark.parametrize("mode", [CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY])
def test_full_only_modes_pass_only_with_the_captured_plan(
    base_config: Any, mode: CUDAGraphMode
) -> None:
    config = gpu_config(base_config, cudagraph_mode=mode)
    assert graph_safety.secure_vllm_config(config, mode.name, plan=CAPTURED).final == mode.name
    with pytest.raises(ConfigError, match="captures whole decode steps"):
        graph_safety.secure_vllm_config(
            gpu_config(base_config, cudagraph_mode=mode), mode.name, plan=SPLIT
        )


def test_a_worker_whose_plan_disagrees_with_the_config_is_refused(base_config: Any) -> None:
    """The API server and the workers decide from the same settings; if they ever disagree
    (different environments), the worker refuses to build its layers."""
    captured_config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    graph_safety.secure_vllm_config(captured_config, plan=CAPTURED)
    with pytest.raises(ConfigError) as info:
        graph_safety.verify_worker_config(captured_config, captured=False)
    assert "captures whole decode steps" in str(info.value)
    assert DEVICE_OP_NAME in str(info.value)  # the cache key names the other op
    split_config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    graph_safety.secure_vllm_config(split_config, plan=SPLIT)
    with pytest.raises(ConfigError, match="compile-cache key names"):
        graph_safety.verify_worker_config(split_config, captured=True)


def test_precheck_lets_full_graphs_through_only_with_the_captured_plan() -> None:
    from types import SimpleNamespace

    args = SimpleNamespace(
        enforce_eager=False,
        compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.FULL),
        lora_target_modules=TARGETS,
    )
    graph_safety.precheck_engine_args(args, plan=CAPTURED)
    with pytest.raises(ConfigError):
        graph_safety.precheck_engine_args(args, plan=SPLIT)


def test_dual_stream_lora_is_refused_whatever_the_plan(
    base_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(graph_safety.DUAL_STREAM_ENV, "1")
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    with pytest.raises(ConfigError, match="lora_linear_async"):
        graph_safety.secure_vllm_config(config, plan=CAPTURED)


def test_the_device_op_is_not_tagged_cudagraph_unsafe() -> None:
    """Inductor's graph partitioning must leave the device op in the graph, the other out."""
    import torch

    import vllm_tensafe.vllm.layers  # noqa: F401  (registers both ops)

    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert tag not in torch.ops.tensafe.he_lora_delta_device.default.tags
    assert graph_safety.op_is_cudagraph_unsafe()
