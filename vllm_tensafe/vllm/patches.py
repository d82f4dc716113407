"""Every piece of vLLM that vllm-tensafe replaces, adds or relies on, in one table.

vLLM has no stable internal API: the plugin wraps private methods and imports objects whose
module moves between releases. So nothing in this project names a vLLM internal directly;
each one is an ``Entry`` below, with the vLLM minor series (``versions``) it was read from and
the parameters it had there (``signature``). Code asks the table for an object
(``resolve("create_error_response")``) or to wrap one (``replace("loader", factory)``), and the
table picks the entry for the running vLLM, checks that it still exists with the expected
parameters, and refuses with a ``ConfigError`` naming the tested versions when it does not.

Version-specific code lives only here: where 0.26 and 0.32 differ (a function moved, a method
was renamed), there is one entry per series under the same name.

Entry kinds:

* ``replace``: vllm-tensafe installs a wrapper in place of the attribute. Wrappers call the
  original with the ``*args, **kwargs`` they received, so a keyword vLLM adds later reaches it.
* ``add``: vllm-tensafe adds an attribute that vLLM must not have.
* ``read``: vllm-tensafe calls, subclasses or reads it.

``python -m vllm_tensafe.vllm.patches`` checks the table against the installed vLLM;
``python -m vllm_tensafe.vllm.surface SRC`` against an unpacked vLLM source tree (a wheel).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.vllm import versions

logger = logging.getLogger("vllm_tensafe.patches")

Action = Literal["replace", "add", "read"]

# The vLLM minor series each entry was read from (docs/architecture.md, "The vLLM patch table").
BOTH = ("0.26", "0.32")
V026 = ("0.26",)
V032 = ("0.32",)

# Marks a wrapper installed by this table, and keeps what it replaced.
_ORIGINAL = "_tensafe_original"


@dataclass(frozen=True)
class Entry:
    """One vLLM attribute, as found in the vLLM series ``versions``."""

    name: str  # what the plugin's code calls it
    module: str  # the module that defines it (not a re-export)
    attribute: str  # dotted path inside the module: "Class.method" or "function"
    versions: tuple[str, ...]
    action: Action
    # Parameters as ``render_signature`` writes them; None: only its existence is checked.
    signature: str | None = None
    # Dataclass fields the plugin reads or sets (for config classes).
    fields: tuple[str, ...] = ()
    # The plugin's use of it, for messages: "where TenSafe adds the encrypted delta".
    purpose: str = ""

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attribute}"


_LORA = "vllm.lora"
_CLI = "vllm.entrypoints.launchers"  # 0.32; 0.26 keeps these in vllm.entrypoints.openai

TABLE: tuple[Entry, ...] = (
    # --- plugin.py: the stock CLI learns --enable-tensafe; every engine build is guarded -------
    Entry(
        "engine_args.add_cli_args",
        "vllm.engine.arg_utils",
        "EngineArgs.add_cli_args",
        BOTH,
        "replace",
        "parser",
        purpose="adds the --enable-tensafe / --tensafe-* flags to vLLM's parser",
    ),
    Entry(
        "engine_args.from_cli_args",
        "vllm.engine.arg_utils",
        "EngineArgs.from_cli_args",
        BOTH,
        "replace",
        "cls, args",
        purpose="writes the TenSafe flags into TENSAFE_* and refuses bad ones before start-up",
    ),
    Entry(
        "engine_args.create_engine_config",
        "vllm.engine.arg_utils",
        "EngineArgs.create_engine_config",
        BOTH,
        "replace",
        "self, usage_context=None, headless=False",
        purpose="activates TenSafe and makes the compilation config safe on every route",
    ),
    Entry(
        "EngineArgs",
        "vllm.engine.arg_utils",
        "EngineArgs",
        BOTH,
        "read",
        fields=("compilation_config", "enable_lora", "enforce_eager", "lora_target_modules"),
    ),
    # --- graph_safety.py -------------------------------------------------------------------
    Entry(
        "CompilationConfig",
        "vllm.config.compilation",
        "CompilationConfig",
        BOTH,
        "read",
        fields=("mode", "cudagraph_mode", "splitting_ops", "use_inductor_graph_partition"),
    ),
    Entry("CUDAGraphMode", "vllm.config.compilation", "CUDAGraphMode", BOTH, "read"),
    Entry("CompilationMode", "vllm.config.compilation", "CompilationMode", BOTH, "read"),
    Entry(
        "VllmConfig",
        "vllm.config.vllm",
        "VllmConfig",
        BOTH,
        "read",
        fields=("compilation_config", "additional_config", "model_config", "lora_config"),
        purpose="additional_config is part of vLLM's compile-cache key",
    ),
    Entry(
        "get_current_vllm_config_or_none",
        "vllm.config.vllm",
        "get_current_vllm_config_or_none",
        BOTH,
        "read",
        "",
        purpose="the worker re-checks the config it was built with",
    ),
    Entry("environment_variables", "vllm.envs", "environment_variables", BOTH, "read"),
    Entry("current_platform", "vllm.platforms", "current_platform", BOTH, "read"),
    # --- loader.py: a .tssp path becomes a LoRAModel(A', B = 0) -------------------------------
    Entry(
        "loader",
        f"{_LORA}.worker_manager",
        "WorkerLoRAManager._load_adapter",
        BOTH,
        "replace",
        "self, lora_request",
        purpose="sends .tssp paths to the TSSP loader",
    ),
    Entry("PEFTHelper", f"{_LORA}.peft_helper", "PEFTHelper", BOTH, "read"),
    Entry(
        "PEFTHelper.from_dict",
        f"{_LORA}.peft_helper",
        "PEFTHelper.from_dict",
        BOTH,
        "read",
        "cls, config_dict",
    ),
    Entry(
        "PEFTHelper.validate_legal",
        f"{_LORA}.peft_helper",
        "PEFTHelper.validate_legal",
        BOTH,
        "read",
        "self, lora_config",
    ),
    Entry(
        "LoRAModel.from_lora_tensors",
        f"{_LORA}.lora_model",
        "LoRAModel.from_lora_tensors",
        BOTH,
        "read",
        "cls, lora_model_id, tensors, peft_helper, device='cuda', dtype=None, "
        "model_vocab_size=None, weights_mapper=None, skip_prefixes=None",
    ),
    # The model's hf-to-vLLM mapper without its stacking rules, for LoRA module names.
    Entry(
        "lora_weights_mapper",
        "vllm.model_executor.models.utils",
        "WeightsMapper.get_rename_mapper",
        V032,
        "read",
        "self",
    ),
    Entry(
        "lora_weights_mapper",
        "vllm.model_executor.models.utils",
        "WeightsMapper.get_unstacked_mapper",
        V026,
        "read",
        "self",
    ),
    # --- layers.py: the encrypted delta inside vLLM's LoRA layers ---------------------------
    Entry(
        "BaseLinearLayerWithLoRA",
        f"{_LORA}.layers.base_linear",
        "BaseLinearLayerWithLoRA",
        BOTH,
        "read",
    ),
    Entry(
        "lora_apply_output",
        f"{_LORA}.layers.base_linear",
        "BaseLinearLayerWithLoRA._apply_lora_to_output",
        BOTH,
        "replace",
        "self, x, output",
        purpose="where TenSafe adds the encrypted delta to each LoRA layer's output",
    ),
    Entry(
        "lora_create_modules",
        f"{_LORA}.model_manager",
        "LoRAModelManager._create_lora_modules",
        BOTH,
        "replace",
        "self",
        purpose="names every LoRA layer for the HE op and re-checks the graph settings",
    ),
    Entry(
        "lora_activate",
        f"{_LORA}.model_manager",
        "LoRAModelManager.activate_adapter",
        BOTH,
        "replace",
        "self, lora_id",
        purpose="binds an encrypted adapter's B' to the slot vLLM gives it",
    ),
    Entry(
        "lora_deactivate",
        f"{_LORA}.model_manager",
        "LoRAModelManager._deactivate_adapter",
        BOTH,
        "replace",
        "self, lora_id",
        purpose="unbinds a slot",
    ),
    Entry(
        "lora_remove_all",
        f"{_LORA}.model_manager",
        "LoRAModelManager.remove_all_adapters",
        BOTH,
        "replace",
        "self",
        purpose="unbinds every slot",
    ),
    Entry(
        "lora_set_mapping",
        f"{_LORA}.model_manager",
        "LoRAModelManager.set_adapter_mapping",
        BOTH,
        "replace",
        "self, mapping",
        purpose="copies the step's token -> slot indices into the device HE op's buffers and "
        "fails requests of adapters that cannot be served, every step before the forward pass",
    ),
    Entry(
        "punica.token_lora_indices",
        f"{_LORA}.punica_wrapper.punica_base",
        "PunicaWrapperBase.token_lora_indices",
        BOTH,
        "read",
        purpose="each token's adapter slot, which the device HE op reads from its own copy",
    ),
    Entry(
        "LoRAConfig",
        "vllm.config.lora",
        "LoRAConfig",
        BOTH,
        "read",
        fields=("max_loras", "max_lora_rank", "target_modules", "fully_sharded_loras"),
        purpose="--lora-target-modules sizes the device HE engines before vLLM captures graphs",
    ),
    # --- punica.py: LoRA index -1 ("no adapter") in vLLM's CPU torch ops ---------------------
    *(
        Entry(
            f"{where}.{op}",
            module,
            op,
            BOTH,
            "replace",
            signature,
            purpose="makes LoRA index -1 mean 'no adapter' in vLLM's CPU LoRA ops",
        )
        for where, module in (
            ("torch_ops", f"{_LORA}.ops.torch_ops.lora_ops"),
            ("punica_cpu", f"{_LORA}.punica_wrapper.punica_cpu"),
        )
        for op, signature in (
            (
                "bgmv_shrink",
                "inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0",
            ),
            (
                "bgmv_expand",
                "inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True",
            ),
            (
                "bgmv_expand_slice",
                "inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, "
                "slice_size, add_inputs=True",
            ),
        )
    ),
    # --- serving.py: the API server refuses bad packages with a 400 and resolves names ------
    Entry(
        "serving.load_lora_adapter",
        "vllm.entrypoints.openai.models.serving",
        "OpenAIServingModels.load_lora_adapter",
        BOTH,
        "replace",
        "self, request, base_model_name=None",
        purpose="POST /v1/load_lora_adapter refuses a bad .tssp with HTTP 400",
    ),
    Entry(
        "serving.unload_lora_adapter",
        "vllm.entrypoints.openai.models.serving",
        "OpenAIServingModels.unload_lora_adapter",
        BOTH,
        "replace",
        "self, request",
        purpose="with TENSAFE_ADAPTER_DIR, POST /v1/unload_lora_adapter acts only on its adapters",
    ),
    Entry(
        "serving.resolve_lora",
        "vllm.entrypoints.openai.models.serving",
        "OpenAIServingModels.resolve_lora",
        BOTH,
        "replace",
        "self, lora_name",
        purpose="requests for TENSAFE_ADAPTER_DIR/NAME.tssp refuse a bad package with HTTP 400",
    ),
    Entry(
        "create_error_response",
        "vllm.entrypoints.serve.exception_handling.error_response",
        "create_error_response",
        V032,
        "read",
        "message, err_type='BadRequestError', status_code=..., param=None",
    ),
    Entry(
        "create_error_response",
        "vllm.entrypoints.serve.utils.error_response",
        "create_error_response",
        V026,
        "read",
        "message, err_type='BadRequestError', status_code=..., param=None",
    ),
    Entry("LoRARequest", f"{_LORA}.request", "LoRARequest", BOTH, "read"),
    Entry("LoRAResolver", f"{_LORA}.resolver", "LoRAResolver", BOTH, "read"),
    Entry("LoRAResolverRegistry", f"{_LORA}.resolver", "LoRAResolverRegistry", BOTH, "read"),
    # --- failures.py: a key-holder failure fails its requests, never the base model ----------
    Entry(
        "engine_core.step",
        "vllm.v1.engine.core",
        "EngineCore.step",
        BOTH,
        "replace",
        "self",
        purpose="drops tokens computed without a failed adapter's delta and fails its requests",
    ),
    Entry(
        "engine_core.step_with_batch_queue",
        "vllm.v1.engine.core",
        "EngineCore.step_with_batch_queue",
        BOTH,
        "replace",
        "self",
        purpose="the same, with pipeline parallelism's batch queue",
    ),
    Entry(
        "executor.init",
        "vllm.v1.executor.abstract",
        "Executor.__init__",
        BOTH,
        "replace",
        "self, vllm_config",
        purpose="gives each engine core's workers its engine id: failures are kept per engine",
    ),
    Entry(
        "get_forward_context",
        "vllm.forward_context",
        "get_forward_context",
        BOTH,
        "read",
        "",
        purpose="a worker skips the key holder only within the forward pass that failed",
    ),
    Entry(
        "is_forward_context_available",
        "vllm.forward_context",
        "is_forward_context_available",
        BOTH,
        "read",
        "",
    ),
    Entry("EngineCoreOutput", "vllm.v1.engine", "EngineCoreOutput", BOTH, "read"),
    Entry("EngineCoreOutputs", "vllm.v1.engine", "EngineCoreOutputs", BOTH, "read"),
    Entry("FinishReason", "vllm.v1.engine", "FinishReason", BOTH, "read"),
    Entry("RequestStatus", "vllm.v1.request", "RequestStatus", BOTH, "read"),
    Entry(
        "generate.raise_if_error",
        "vllm.entrypoints.generate.base.serving",
        "GenerateBaseServing._raise_if_error",
        BOTH,
        "replace",
        "self, finish_reason, request_id",
        purpose="names the key holder's error in the HTTP answer (503 or 403)",
    ),
    Entry(
        "GenerationError",
        "vllm.exceptions",
        "GenerationError",
        V032,
        "read",
        purpose="base of the 403 error for a refused encrypted adapter",
    ),
    Entry(
        "GenerationError",
        "vllm.entrypoints.openai.engine.protocol",
        "GenerationError",
        V026,
        "read",
    ),
    Entry(
        "RetryableRequestError",
        "vllm.exceptions",
        "RetryableRequestError",
        V032,
        "read",
        purpose="base of the 503 error for an unreachable key holder",
    ),
    # 0.26 has no retryable error class: its GenerationError answers with its status_code.
    Entry(
        "RetryableRequestError",
        "vllm.entrypoints.openai.engine.protocol",
        "GenerationError",
        V026,
        "read",
    ),
    Entry(
        "GracefulHTTPError",
        "vllm.exceptions",
        "GracefulHTTPError",
        V032,
        "read",
        purpose="also a base of those two errors, so vLLM names their status as the error type "
        "(Forbidden, Service Unavailable) instead of InternalServerError",
    ),
    # 0.26 has no such class (its GenerationError stands in: the error types stay vLLM's).
    Entry(
        "GracefulHTTPError",
        "vllm.entrypoints.openai.engine.protocol",
        "GenerationError",
        V026,
        "read",
    ),
    Entry(
        "generate.streaming_generation_error",
        "vllm.entrypoints.generate.base.serving",
        "GenerateBaseServing._convert_generation_error_to_streaming_response",
        V032,
        "replace",
        "self, e",
        purpose="the same error type in a streamed answer",
    ),
    # Not installed on 0.26 (no GracefulHTTPError there); listed so every series has the name.
    Entry(
        "generate.streaming_generation_error",
        "vllm.entrypoints.generate.base.serving",
        "GenerateBaseServing._convert_generation_error_to_streaming_response",
        V026,
        "replace",
    ),
    # --- status_route.py and stat_logger.py ----------------------------------------------------
    Entry(
        "worker.tensafe_adapter_status",
        "vllm.v1.worker.worker_base",
        "WorkerBase.tensafe_adapter_status",
        BOTH,
        "add",
        purpose="the worker RPC behind GET /v1/tensafe/adapters",
    ),
    Entry("StatLoggerBase", "vllm.v1.metrics.loggers", "StatLoggerBase", BOTH, "read"),
    # --- entrypoints.py: the guide's API (compat.py) over vLLM's own builders ---------------
    Entry(
        "AsyncEngineArgs",
        "vllm.engine.arg_utils",
        "AsyncEngineArgs",
        BOTH,
        "read",
        fields=(
            "model",
            "tokenizer",
            "tensor_parallel_size",
            "gpu_memory_utilization",
            "max_num_seqs",
            "dtype",
            "enable_lora",
            "max_model_len",
            "block_size",
            "max_lora_rank",
        ),
    ),
    Entry("AsyncLLM", "vllm.v1.engine.async_llm", "AsyncLLM", BOTH, "read"),
    Entry(
        "AsyncLLM.from_engine_args",
        "vllm.v1.engine.async_llm",
        "AsyncLLM.from_engine_args",
        BOTH,
        "read",
        "cls, engine_args, start_engine_loop=True, usage_context=..., stat_loggers=None",
    ),
    Entry("SamplingParams", "vllm.sampling_params", "SamplingParams", BOTH, "read"),
    Entry(
        "FlexibleArgumentParser",
        "vllm.utils.argparse_utils",
        "FlexibleArgumentParser",
        BOTH,
        "read",
    ),
    Entry("make_arg_parser", f"{_CLI}.cli_args", "make_arg_parser", V032, "read", "parser"),
    Entry(
        "make_arg_parser",
        "vllm.entrypoints.openai.cli_args",
        "make_arg_parser",
        V026,
        "read",
        "parser",
    ),
    Entry(
        "validate_parsed_serve_args",
        f"{_CLI}.cli_args",
        "validate_parsed_serve_args",
        V032,
        "read",
        "args",
    ),
    Entry(
        "validate_parsed_serve_args",
        "vllm.entrypoints.openai.cli_args",
        "validate_parsed_serve_args",
        V026,
        "read",
        "args",
    ),
    Entry(
        "build_async_engine_client",
        f"{_CLI}.api_server.entry",
        "build_async_engine_client",
        V032,
        "read",
        "args, *, usage_context=..., client_config=None",
    ),
    Entry(
        "build_async_engine_client",
        "vllm.entrypoints.openai.api_server",
        "build_async_engine_client",
        V026,
        "read",
        "args, *, usage_context=..., client_config=None",
    ),
    Entry(
        "build_app",
        f"{_CLI}.app",
        "build_app",
        V032,
        "read",
        "args, supported_tasks=None, model_config=None",
    ),
    Entry(
        "build_app",
        "vllm.entrypoints.openai.api_server",
        "build_app",
        V026,
        "read",
        "args, supported_tasks=None, model_config=None",
    ),
    Entry(
        "init_app_state",
        f"{_CLI}.api_server.app_state",
        "init_app_state",
        V032,
        "read",
        "engine_client, state, args, supported_tasks=None",
    ),
    Entry(
        "init_app_state",
        "vllm.entrypoints.openai.api_server",
        "init_app_state",
        V026,
        "read",
        "engine_client, state, args, supported_tasks=None",
    ),
    Entry(
        "serve_http",
        f"{_CLI}.launcher",
        "serve_http",
        V032,
        "read",
        "app, sock, enable_ssl_refresh=False, peer_loads=None, **uvicorn_kwargs",
    ),
    Entry(
        "serve_http",
        "vllm.entrypoints.launcher",
        "serve_http",
        V026,
        "read",
        "app, sock, enable_ssl_refresh=False, **uvicorn_kwargs",
    ),
    Entry("EngineDeadError", "vllm.v1.engine.exceptions", "EngineDeadError", BOTH, "read"),
)

# vLLM environment variables the plugin reads or refuses (checked to exist in vllm.envs).
ENV_VARS: dict[str, tuple[str, ...]] = {
    "VLLM_LORA_ENABLE_DUAL_STREAM": BOTH,
    "VLLM_USE_BREAKABLE_CUDAGRAPH": BOTH,
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": BOTH,
    "VLLM_DISABLE_COMPILE_CACHE": BOTH,
}


# --- looking entries up ---------------------------------------------------------------------


def entries(name: str) -> list[Entry]:
    found = [entry for entry in TABLE if entry.name == name]
    if not found:
        raise KeyError(f"no vLLM patch table entry named {name!r}")
    return found


def entry_for(name: str, series: str | None = None) -> Entry:
    """The entry of ``name`` for the running vLLM (or ``series``).

    For a series outside the table (an untested vLLM that the operator allowed), the entry of
    the newest tested series whose target exists is used.
    """
    series = series or versions.running_series()
    candidates = entries(name)
    for entry in candidates:
        if series in entry.versions:
            return entry
    ordered = sorted(
        candidates, key=lambda e: max(versions.series_key(v) for v in e.versions), reverse=True
    )
    for entry in ordered:
        if _lookup(entry)[0] is not None:
            return entry
    return ordered[0]


def resolve(name: str) -> Any:
    """The vLLM object of entry ``name`` (for ``replace`` entries: the original vLLM one).

    Raises ConfigError when it is missing, or when its parameters changed (unless the operator
    allowed an untested vLLM: then a warning).
    """
    entry = entry_for(name)
    _, raw = _require(entry)
    return _original(_unwrap_descriptor(raw))


def _require(entry: Entry) -> tuple[Any, Any]:
    owner, raw = _lookup(entry)
    if owner is None or raw is _MISSING:
        raise _refusal(entry, "is missing")
    problem = _signature_problem(entry, raw)
    if problem:
        _changed(entry, problem)
    return owner, raw


# --- installing -----------------------------------------------------------------------------


def replace(name: str, factory: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Install ``factory(original)`` in place of entry ``name``. Idempotent.

    ``original`` is the plain function (for a classmethod it takes ``cls`` first, for a method
    ``self``); the wrapper keeps the same convention and is wrapped back into a classmethod or
    staticmethod as the original was. Returns False when it was installed already.
    """
    entry = entry_for(name)
    if entry.action != "replace":
        raise ValueError(f"vLLM patch table entry {name!r} is not a 'replace' entry")
    owner, raw = _require(entry)
    current = _unwrap_descriptor(raw)
    if _original(current) is not current:
        return False
    wrapper = factory(current)
    setattr(wrapper, _ORIGINAL, current)
    wrapper.__name__ = getattr(current, "__name__", wrapper.__name__)
    wrapper.__qualname__ = getattr(current, "__qualname__", wrapper.__qualname__)
    wrapper.__doc__ = getattr(current, "__doc__", None)
    if isinstance(raw, staticmethod):
        value: Any = staticmethod(wrapper)
    elif isinstance(raw, classmethod):
        value = classmethod(wrapper)
    else:
        value = wrapper
    setattr(owner, _leaf(entry), value)
    logger.debug("Patched %s (%s)", entry.target, entry.purpose or entry.name)
    return True


def add(name: str, value: Any) -> bool:
    """Add attribute ``name`` (an ``add`` entry). Returns False when ours is there already."""
    entry = entry_for(name)
    owner, raw = _lookup(entry)
    if owner is None:
        raise _refusal(entry, "cannot be added: its owner is missing")
    if raw is not _MISSING:
        if _is_ours(raw) or raw is value:
            return False
        raise _refusal(entry, "already exists in vLLM, so adding it would replace vLLM's own")
    if callable(value):
        setattr(value, _ORIGINAL, True)
    setattr(owner, _leaf(entry), value)
    return True


def is_installed(name: str) -> bool:
    """Whether this table's wrapper (or added attribute) is in place for entry ``name``."""
    try:
        entry = entry_for(name)
    except KeyError:
        return False
    _, raw = _lookup(entry)
    return raw is not _MISSING and _is_ours(raw)


def optional(name: str, install: Callable[[], Any], effect: str) -> bool:
    """Run ``install`` for an optional hook; on failure log a warning naming what is off."""
    try:
        install()
    except ConfigError as exc:
        logger.warning("TenSafe: %s is off: %s", effect, exc.cause)
        return False
    except ImportError as exc:
        logger.warning("TenSafe: %s is off: %s cannot be imported (%s)", effect, name, exc)
        return False
    return True


# --- checking -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    entry: Entry
    message: str

    def __str__(self) -> str:
        series = "/".join(self.entry.versions)
        return f"{self.entry.name} ({self.entry.target}, vLLM {series}): {self.message}"


def check(entry: Entry) -> Problem | None:
    """What is wrong with ``entry`` in the running vLLM (None: it is as the table says)."""
    owner, raw = _lookup(entry)
    if entry.action == "add":
        if owner is None:
            return Problem(entry, "its owner is missing")
        if raw is not _MISSING and not _is_ours(raw):
            return Problem(entry, "vLLM has an attribute of this name now")
        return None
    if owner is None or raw is _MISSING:
        return Problem(entry, "missing")
    problem = _signature_problem(entry, raw)
    return Problem(entry, problem) if problem else None


def check_all(series: str | None = None) -> list[Problem]:
    """Problems of every entry for ``series`` (default: the running vLLM) and of the env vars."""
    series = series or versions.running_series()
    problems = [check(entry) for entry in TABLE if series in entry.versions]
    known = _env_names()
    for name, env_series in ENV_VARS.items():
        if series in env_series and name not in known:
            problems.append(
                Problem(
                    Entry(
                        name, "vllm.envs", f"environment_variables[{name!r}]", env_series, "read"
                    ),
                    "vLLM no longer defines this environment variable",
                )
            )
    return [p for p in problems if p is not None]


def check_names(names: Iterable[str]) -> None:
    """Refuse (ConfigError) if any entry of ``names`` is missing or changed."""
    for name in names:
        _require(entry_for(name))


def env_flag(name: str) -> bool:
    """Whether vLLM environment variable ``name`` is on, as vLLM itself parses it.

    A value vLLM's parser rejects counts as on unless it reads as off ("", 0, false, no, off):
    for the variables TenSafe refuses, doubt must not let one through.
    """
    import os

    if name not in ENV_VARS:
        raise KeyError(f"{name} is not in the vLLM patch table's ENV_VARS")
    value = os.environ.get(name)
    if value is None:
        return False
    parser = importlib.import_module("vllm.envs").environment_variables.get(name)
    try:
        return bool(parser()) if parser is not None else _truthy(value)
    except (TypeError, ValueError):
        return _truthy(value)


def _truthy(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def _env_names() -> set[str]:
    envs = importlib.import_module("vllm.envs")
    return set(getattr(envs, "environment_variables", {}))


# --- internals ------------------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def _lookup(entry: Entry) -> tuple[Any, Any]:
    """(owner, raw attribute) of ``entry``; owner None when the module or class is missing,
    raw _MISSING when the last attribute is."""
    try:
        owner: Any = importlib.import_module(entry.module)
    except ImportError as exc:
        logger.debug("Cannot import %s: %s", entry.module, exc)
        return None, _MISSING
    parts = entry.attribute.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part, _MISSING)
        if owner is _MISSING:
            return None, _MISSING
    leaf = parts[-1]
    if inspect.isclass(owner):
        try:
            raw = inspect.getattr_static(owner, leaf)
        except AttributeError:
            raw = _MISSING
    else:
        raw = getattr(owner, leaf, _MISSING)
    return owner, raw


def _leaf(entry: Entry) -> str:
    return entry.attribute.rsplit(".", 1)[-1]


def _unwrap_descriptor(raw: Any) -> Any:
    if isinstance(raw, (staticmethod, classmethod)):
        return raw.__func__
    return raw


def _is_ours(raw: Any) -> bool:
    value = _unwrap_descriptor(raw)
    return inspect.isfunction(value) and getattr(value, _ORIGINAL, None) is not None


def _original(value: Any) -> Any:
    if not inspect.isfunction(value):  # the table's wrappers are plain functions
        return value
    original = getattr(value, _ORIGINAL, None)
    return value if original is None or original is True else original


def _signature_problem(entry: Entry, raw: Any) -> str | None:
    value = _original(_unwrap_descriptor(raw))
    if entry.signature is not None:
        try:
            found = render_signature(value)
        except (TypeError, ValueError):
            return "its parameters cannot be read"
        if found != entry.signature:
            return f"expected parameters ({entry.signature}), found ({found})"
    if entry.fields:
        if not dataclasses.is_dataclass(value):
            return "is no longer a dataclass"
        names = {f.name for f in dataclasses.fields(value)}
        missing = [f for f in entry.fields if f not in names]
        if missing:
            return f"has no field {', '.join(missing)}"
    return None


def render_signature(fn: Callable[..., Any]) -> str:
    """Parameters as the table writes them: names, simple defaults, ``...`` for others."""
    sig = inspect.signature(fn, follow_wrapped=True)  # through vLLM's own decorators
    parts: list[str] = []
    star = False
    for param in sig.parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            parts.append(f"*{param.name}")
            star = True
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            parts.append(f"**{param.name}")
            continue
        if param.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        text = param.name
        if param.default is not inspect.Parameter.empty:
            text += f"={render_default(param.default)}"
        parts.append(text)
    return ", ".join(parts)


def render_default(value: Any) -> str:
    if value is None or type(value) in (bool, int, float, str):
        return repr(value)
    return "..."


def _refusal(entry: Entry, what: str) -> ConfigError:
    running = versions.running_version()
    use = f" ({entry.purpose})" if entry.purpose else ""
    return ConfigError(
        f"vLLM {running}: {entry.target}{use} {what}; vllm-tensafe was written against "
        f"vLLM {' and '.join(entry.versions)} and is tested with {versions.tested_text()}",
        f"install a tested vLLM: {versions.install_hint()}",
    )


def _changed(entry: Entry, problem: str) -> None:
    if versions.untested_allowed():
        logger.warning(
            "TenSafe: vLLM %s: %s %s (TENSAFE_ALLOW_UNTESTED_VLLM is set, trying anyway)",
            versions.running_version(),
            entry.target,
            problem,
        )
        return
    raise _refusal(entry, f"changed: {problem}")


def main() -> int:
    """``python -m vllm_tensafe.vllm.patches``: check the table against the installed vLLM."""
    series = versions.running_series()
    problems = check_all(series)
    checked = sum(1 for e in TABLE if series in e.versions)
    print(f"vLLM {versions.running_version()} (series {series}): {checked} table entries")
    for problem in problems:
        print(f"  PROBLEM {problem}")
    if not problems:
        print("  all present with the expected parameters")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
