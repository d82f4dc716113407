"""The CUDA-graph guard on vLLM's own config objects, for every compilation and cudagraph mode.

On CPU vLLM runs no CUDA graphs, so these tests hand the guard the compilation configs vLLM
builds on a GPU: vLLM's own ``CompilationConfig`` with vLLM's own splitting-op defaults
(``set_splitting_ops_for_v1``, what ``VllmConfig.__post_init__`` runs), inside a real
``VllmConfig``. tests/gpu/test_cuda_graphs.py serves the same settings on an H200.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import Keys
from vllm_tensafe.errors import ConfigError
from vllm_tensafe.vllm import graph_safety
from vllm_tensafe.vllm.graph_safety import OP_NAME

vllm_config_mod = pytest.importorskip("vllm.config")
from vllm.config.compilation import (  # noqa: E402
    CompilationConfig,
    CompilationMode,
    CUDAGraphMode,
)

ATTENTION_OP = "vllm::unified_attention_with_output"


@pytest.fixture(autouse=True)
def _vllm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (graph_safety.DUAL_STREAM_ENV, graph_safety.BREAKABLE_ENV):
        monkeypatch.delenv(name, raising=False)


def gpu_config(base: Any, **compilation: Any) -> Any:
    """A VllmConfig whose compilation settings are what vLLM resolves them to on a GPU."""
    import copy

    cc = CompilationConfig(**{"mode": CompilationMode.VLLM_COMPILE, **compilation})
    cc.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    config = copy.copy(base)
    config.compilation_config = cc
    config.additional_config = {}
    return config


# --- the modes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "requested"),
    [
        (CUDAGraphMode.FULL_AND_PIECEWISE, "unset"),  # vLLM's default on GPUs
        (CUDAGraphMode.FULL_AND_PIECEWISE, "FULL_AND_PIECEWISE"),
        (CUDAGraphMode.PIECEWISE, "PIECEWISE"),
    ],
)
def test_graphs_become_piecewise_with_the_op_split_out(
    base_config: Any, mode: CUDAGraphMode, requested: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = gpu_config(base_config, cudagraph_mode=mode)
    vllm_defaults = list(config.compilation_config.splitting_ops)
    assert ATTENTION_OP in vllm_defaults and OP_NAME not in vllm_defaults
    with caplog.at_level(logging.INFO, logger="vllm_tensafe"):
        decision = graph_safety.secure_vllm_config(config, requested)
    cc = config.compilation_config
    assert cc.cudagraph_mode == CUDAGraphMode.PIECEWISE
    # vLLM's own splitting ops are kept, in order, and the HE op joins them.
    assert cc.splitting_ops == [*vllm_defaults, OP_NAME]
    assert decision.final == "PIECEWISE" and decision.resolved == mode.name
    assert decision.requested == requested and decision.split_added
    assert "TenSafe graph guard: cudagraph_mode" in caplog.text
    if mode == CUDAGraphMode.FULL_AND_PIECEWISE:
        # The log says why the mode changed.
        assert "FULL_AND_PIECEWISE -> PIECEWISE: vLLM's FULL decode graphs would capture" in (
            caplog.text
        )
    graph_safety.verify_worker_config(config)  # what the worker re-checks passes


def test_no_graphs_stay_no_graphs(base_config: Any) -> None:
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.NONE)
    before = list(config.compilation_config.splitting_ops)
    decision = graph_safety.secure_vllm_config(config)
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert config.compilation_config.splitting_ops == before and not decision.split_added
    graph_safety.verify_worker_config(config)


def test_enforce_eager_config_from_vllm_passes(base_config: Any) -> None:
    # What vLLM builds for --enforce-eager (and on CPU): no compilation, no graphs.
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.NONE)
    config.compilation_config.mode = CompilationMode.NONE
    assert graph_safety.secure_vllm_config(config).final == "NONE"


@pytest.mark.parametrize("mode", [CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY])
def test_full_only_modes_are_refused(base_config: Any, mode: CUDAGraphMode) -> None:
    config = gpu_config(base_config, cudagraph_mode=mode)
    with pytest.raises(ConfigError) as info:
        graph_safety.secure_vllm_config(config, mode.name)
    message = str(info.value)
    assert f"CUDA graph mode {mode.name} (requested with -cc.cudagraph_mode={mode.name})" in message
    assert OP_NAME in message and "base model" in message
    assert "--enforce-eager" in message and "-cc.cudagraph_mode=PIECEWISE" in message
    assert OP_NAME not in config.compilation_config.splitting_ops


@pytest.mark.parametrize(
    "settings",
    [
        {"splitting_ops": []},  # "no splitting": vLLM turns FULL_AND_PIECEWISE into FULL
        {"pass_config": {"fuse_attn_quant": True}},  # attention+quant fusion: vLLM picks FULL
    ],
)
def test_full_graphs_chosen_by_vllm_are_refused(base_config: Any, settings: dict) -> None:
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE, **settings)
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.FULL  # vLLM's own choice
    with pytest.raises(ConfigError) as info:
        graph_safety.secure_vllm_config(config, "unset")
    message = str(info.value)
    assert "chosen by vLLM from the other compilation settings (requested: unset)" in message
    assert "--enforce-eager" in message and "fuse_attn_quant" in message


def test_piecewise_graphs_without_vllms_compiler_are_refused(base_config: Any) -> None:
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.PIECEWISE)
    config.compilation_config.mode = CompilationMode.STOCK_TORCH_COMPILE
    with pytest.raises(ConfigError, match=r"only vLLM.s own compiler .* splits its graphs"):
        graph_safety.secure_vllm_config(config)


def test_inductor_partitioning_needs_the_op_tagged(
    base_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vllm_tensafe.vllm.layers  # noqa: F401  (registers the op)

    assert graph_safety.op_is_cudagraph_unsafe(), "the op carries torch's cudagraph_unsafe tag"
    config = gpu_config(
        base_config, cudagraph_mode=CUDAGraphMode.PIECEWISE, use_inductor_graph_partition=True
    )
    graph_safety.secure_vllm_config(config)
    assert OP_NAME in config.compilation_config.splitting_ops  # vLLM's partition rules
    # On a torch that cannot tag it, partitioning would capture the op: refused.
    monkeypatch.setattr(graph_safety, "op_is_cudagraph_unsafe", lambda: False)
    config = gpu_config(
        base_config, cudagraph_mode=CUDAGraphMode.PIECEWISE, use_inductor_graph_partition=True
    )
    with pytest.raises(ConfigError, match="use_inductor_graph_partition=true") as info:
        graph_safety.secure_vllm_config(config)
    assert "--enforce-eager" in str(info.value)


def test_breakable_cuda_graphs_are_refused(
    base_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(graph_safety.BREAKABLE_ENV, "1")
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.PIECEWISE)
    with pytest.raises(ConfigError, match="VLLM_USE_BREAKABLE_CUDAGRAPH=1") as info:
        graph_safety.secure_vllm_config(config)
    assert "VLLM_USE_BREAKABLE_CUDAGRAPH=0" in str(info.value)
    assert "--enforce-eager" in str(info.value)


@pytest.mark.parametrize("value", ["1", "true"])
def test_dual_stream_lora_is_refused(
    base_config: Any, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(graph_safety.DUAL_STREAM_ENV, value)
    with pytest.raises(ConfigError) as info:
        graph_safety.refuse_dual_stream()
    message = str(info.value)
    assert "lora_linear_async, which never calls _apply_lora_to_output" in message
    assert "unset VLLM_LORA_ENABLE_DUAL_STREAM" in message
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.NONE)
    with pytest.raises(ConfigError, match="VLLM_LORA_ENABLE_DUAL_STREAM"):
        graph_safety.secure_vllm_config(config)
    with pytest.raises(ConfigError, match="VLLM_LORA_ENABLE_DUAL_STREAM"):
        graph_safety.verify_worker_config(config)


def test_dual_stream_off_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(graph_safety.DUAL_STREAM_ENV, "0")
    graph_safety.refuse_dual_stream()


# --- the engine arguments (refused before vLLM builds anything) --------------------------------


@pytest.mark.parametrize(
    ("kwargs", "refused"),
    [
        ({}, False),
        ({"compilation_config": {"cudagraph_mode": "PIECEWISE"}}, False),
        ({"compilation_config": {"cudagraph_mode": "FULL_AND_PIECEWISE"}}, False),
        ({"compilation_config": {"cudagraph_mode": "FULL"}}, True),
        ({"compilation_config": {"cudagraph_mode": "FULL_DECODE_ONLY"}}, True),
        ({"compilation_config": {"cudagraph_mode": "FULL"}, "enforce_eager": True}, False),
    ],
)
def test_precheck_of_engine_arguments(kwargs: dict, refused: bool) -> None:
    from vllm.engine.arg_utils import EngineArgs

    engine_args = EngineArgs(model="unused", **kwargs)
    if refused:
        with pytest.raises(ConfigError, match="--enforce-eager"):
            graph_safety.precheck_engine_args(engine_args)
    else:
        graph_safety.precheck_engine_args(engine_args)


# --- the compile-cache key and the worker's check ------------------------------------------


def test_tensafe_enters_the_compile_cache_key(base_config: Any) -> None:
    plain = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.NONE)
    guarded = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.NONE)
    decision = graph_safety.secure_vllm_config(guarded)
    assert guarded.additional_config[graph_safety.CACHE_KEY_FIELD] == graph_safety.cache_key()
    assert "part of its key" in decision.cache
    # vLLM's compile-cache key (VllmConfig.compute_hash) tells the two apart: a graph
    # compiled with TenSafe off is not reused with it on.
    assert plain.compute_hash() != guarded.compute_hash()


def test_without_a_dict_to_key_the_cache_is_turned_off(
    base_config: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(graph_safety.DISABLE_CACHE_ENV, raising=False)
    config = gpu_config(base_config, cudagraph_mode=CUDAGraphMode.NONE)

    class PlatformConfig:
        def compute_hash(self) -> str:
            return "platform"

    config.additional_config = PlatformConfig()
    with caplog.at_level(logging.WARNING, logger="vllm_tensafe"):
        decision = graph_safety.secure_vllm_config(config)
    assert os.environ[graph_safety.DISABLE_CACHE_ENV] == "1"
    assert decision.cache.startswith("off") and "VLLM_DISABLE_COMPILE_CACHE=1" in caplog.text


@pytest.mark.parametrize(
    ("mode", "guarded", "split", "problem"),
    [
        (CUDAGraphMode.PIECEWISE, False, True, "lacks TenSafe's compile-cache key"),
        (CUDAGraphMode.FULL_AND_PIECEWISE, True, True, "captures whole decode steps"),
        (CUDAGraphMode.FULL, True, False, "captures whole decode steps"),
        (CUDAGraphMode.PIECEWISE, True, False, f"do not split at {OP_NAME}"),
    ],
)
def test_the_worker_refuses_a_config_the_guard_did_not_see(
    base_config: Any, mode: CUDAGraphMode, guarded: bool, split: bool, problem: str
) -> None:
    config = gpu_config(base_config, cudagraph_mode=mode)
    cc = config.compilation_config
    cc.cudagraph_mode = mode  # as handed to AsyncLLM(vllm_config=...) without the guard
    if split:
        cc.splitting_ops = [*cc.splitting_ops, OP_NAME]
    if guarded:
        config.additional_config = {graph_safety.CACHE_KEY_FIELD: graph_safety.cache_key()}
    with pytest.raises(ConfigError) as info:
        graph_safety.verify_worker_config(config)
    assert problem in str(info.value)
    assert "secure_vllm_config" in str(info.value)


# --- the op itself ------------------------------------------------------------------------------


def test_the_op_refuses_to_run_under_stream_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_tensafe.vllm import layers

    x, out = torch.zeros(2, 4), torch.ones(2, 3)
    monkeypatch.setitem(layers._LAYERS, "model.layers.0.q_proj", object())
    # CPU tensors never run under CUDA stream capture; make this one look like it does.
    monkeypatch.setattr(layers, "_under_stream_capture", lambda tensor: True)
    with pytest.raises(ConfigError) as info:
        torch.ops.tensafe.he_lora_delta(x, out, "model.layers.0.q_proj")
    assert "ran inside a CUDA graph capture" in str(info.value)
    assert "--enforce-eager" in str(info.value)
    assert torch.equal(out, torch.ones(2, 3))


def test_the_op_adds_in_place_and_vllms_splitter_isolates_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What vLLM's compiler does with the op: Dynamo records it, vLLM's split_graph gives it
    a graph piece of its own (run eagerly between CUDA graph pieces), and the mutation of the
    layer output survives splitting and AOT functionalization."""
    from vllm.compilation.backends import split_graph

    from vllm_tensafe.vllm import layers

    class Layer:
        pass

    def fake_add(layer: Any, x: torch.Tensor, output: torch.Tensor) -> None:
        output += x[:, : output.shape[1]] * 10  # stands in for the HE delta

    monkeypatch.setattr(layers, "add_layer_delta", fake_add)
    monkeypatch.setitem(layers._LAYERS, "layer", Layer())

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        output = x @ w  # the base layer (and vLLM's LoRA) in one graph piece
        torch.ops.tensafe.he_lora_delta(x, output, "layer")
        return torch.relu(output)  # the next piece reads the mutated output

    x, w = torch.randn(3, 4), torch.randn(4, 2)
    want = torch.relu(x @ w + x[:, :2] * 10)
    pieces: list[Any] = []

    def vllm_like_backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        split_gm, items = split_graph(gm, [ATTENTION_OP, OP_NAME])
        pieces.extend(items)
        return split_gm

    torch._dynamo.reset()
    got = torch.compile(forward, backend=vllm_like_backend, fullgraph=True)(x, w)
    assert torch.allclose(got, want)
    splitting = [item for item in pieces if item.is_splitting_graph]
    assert len(splitting) == 1 and len(pieces) == 3
    assert "he_lora_delta" in splitting[0].graph.code
    torch._dynamo.reset()
    aot = torch.compile(forward, backend="aot_eager", fullgraph=True)(x, w)
    assert torch.allclose(aot, want)


# --- every route builds a guarded config (one subprocess: vLLM's real EngineArgs) -----------

ROUTES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm_tensafe.errors import ConfigError
    results = {}

    def guarded(config):
        return {"key": "tensafe" in config.additional_config,
                "lora": config.lora_config is not None}

    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    model = sys.argv[1]
    common = dict(model=model, max_model_len=256, dtype="float32")
    results["EngineArgs"] = guarded(EngineArgs(**common).create_engine_config())
    results["AsyncEngineArgs"] = guarded(AsyncEngineArgs(**common).create_engine_config())

    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model, "--max-model-len", "256", "--enable-tensafe"])
    results["cli"] = guarded(AsyncEngineArgs.from_cli_args(args).create_engine_config())
    args = parser.parse_args(["--model", model, "--enable-tensafe",
                              "-cc", '{"cudagraph_mode": "FULL"}'])
    try:
        AsyncEngineArgs.from_cli_args(args)
        results["cli_full"] = "accepted"
    except SystemExit as exc:
        results["cli_full"] = exc.code

    from vllm_tensafe.api import TenSafeVLLMConfig
    config = TenSafeVLLMConfig(model=model, max_model_len=256, dtype="float32")
    results["compat"] = guarded(config.to_engine_args().create_engine_config())

    full = {"cudagraph_mode": "FULL"}
    def refused(build):
        try:
            build()
        except ConfigError as exc:
            return str(exc)
        return "accepted"

    import vllm
    from vllm.v1.engine.async_llm import AsyncLLM
    results["LLM_full"] = refused(lambda: vllm.LLM(**common, compilation_config=full))
    results["AsyncLLM_full"] = refused(
        lambda: AsyncLLM.from_engine_args(AsyncEngineArgs(**common, compilation_config=full)))
    results["compat_full"] = refused(lambda: TenSafeVLLMConfig(
        model=model, max_model_len=256, engine_kwargs={"compilation_config": full}
    ).to_engine_args().create_engine_config())
    import asyncio
    from vllm_tensafe.api import TenSafeVLLMServer
    server = TenSafeVLLMServer(TenSafeVLLMConfig(
        model=model, max_model_len=256, dtype="float32",
        engine_kwargs={"compilation_config": full}))
    results["compat_server_full"] = refused(lambda: asyncio.run(server.build()))
    import os
    os.environ["VLLM_LORA_ENABLE_DUAL_STREAM"] = "1"
    results["dual_stream"] = refused(lambda: EngineArgs(**common).create_engine_config())
    print("RESULTS " + json.dumps(results))
    """
)


def test_every_route_builds_a_guarded_config(tiny_llama: Path, owner_keys: Keys) -> None:
    """vllm serve's EngineArgs path, vllm.LLM, AsyncLLM and the guide's API: each one's config
    carries TenSafe's cache key, and a FULL-only mode is refused before any engine starts
    (vllm serve exits with one line; the Python routes raise the ConfigError)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TENSAFE_", "VLLM_LORA_ENABLE_DUAL_STREAM"))
    }
    env.update(
        {
            "TENSAFE_ENABLED": "true",
            "TENSAFE_TRUSTED_KEYS": str(owner_keys.signing_pub),
            "TENSAFE_HE_SECRET": str(owner_keys.he_secret),
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    out = subprocess.run(
        [sys.executable, "-c", ROUTES_SCRIPT, str(tiny_llama)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, f"the script failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    results = json.loads(lines[-1].removeprefix("RESULTS "))
    for route in ("EngineArgs", "AsyncEngineArgs", "cli", "compat"):
        assert results[route] == {"key": True, "lora": True}, route
    assert results["cli_full"] == 2  # vllm serve exits in its first second
    assert "vllm-tensafe: error: CUDA graph mode FULL" in out.stderr
    for route in ("LLM_full", "AsyncLLM_full", "compat_full", "compat_server_full"):
        assert "CUDA graph mode FULL" in results[route], (route, results[route])
        assert "--enforce-eager" in results[route]
    assert "VLLM_LORA_ENABLE_DUAL_STREAM=1" in results["dual_stream"]
