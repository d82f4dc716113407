"""Keep vLLM's compiled graphs from replaying the encrypted-adapter op without running it.

The HE step is one custom op, ``tensafe::he_lora_delta``, per LoRA layer per engine step. It
must run Python every step: it reads which tokens belong to which encrypted adapter, copies
U to the host, and calls TenSEAL and the key holder. A CUDA graph replays recorded kernels and
never calls Python, so an op captured in a graph adds whatever it added at capture time: zero
(graphs are captured with no adapter bound). Measured on an H200 with vLLM 0.26's default
compilation: every encrypted-adapter request was answered with the base model's tokens and
HTTP 200.

So, whenever TenSafe is on, before the engine is built:

* ``FULL_AND_PIECEWISE`` (vLLM's default on GPUs) becomes ``PIECEWISE``: vLLM's FULL decode
  graphs would capture the op; piecewise graphs stop at every splitting op and run it eagerly.
* ``tensafe::he_lora_delta`` joins vLLM's own splitting ops (its defaults are kept), and the op
  is tagged ``cudagraph_unsafe`` so Inductor's graph partitioning also leaves it out.
* Where that cannot hold, a ``ConfigError`` names ``--enforce-eager`` and the setting: a
  FULL-only mode (``FULL``, ``FULL_DECODE_ONLY``), breakable CUDA graphs
  (``VLLM_USE_BREAKABLE_CUDAGRAPH``, which break only at vLLM's own ops), piecewise graphs
  without vLLM's compiler, Inductor partitioning on a torch without the tag.
* ``VLLM_LORA_ENABLE_DUAL_STREAM=1`` is refused: vLLM's dual-stream LoRA never calls
  ``_apply_lora_to_output``, where the encrypted delta is added.
* TenSafe's graph-relevant settings go into ``additional_config``, which is part of vLLM's
  compile-cache key, so a graph compiled with TenSafe off is never reused with it on.

The worker checks the config it was built with again (``verify_worker_config``), and the op
itself refuses to run under stream capture (layers.py), so a route that skipped this module
or a future vLLM that captures the op anyway fails loudly instead of answering wrong.

One case needs none of this: the torch engine's captured path (runtime.HEPlan.captured: local
key holder, model on CUDA, ``--lora-target-modules`` set, TENSAFE_HE_CUDA_GRAPHS on). Its op,
``tensafe::he_lora_delta_device``, reads only persistent buffers that are written before each
step and after every adapter change (device_he.py), so a replay computes this step's delta;
vLLM's compilation settings, FULL_AND_PIECEWISE included, are then left as they are (the
dual-stream refusal stays: that route never calls the op).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from vllm_tensafe.errors import ConfigError
from vllm_tensafe.vllm import patches

logger = logging.getLogger("vllm_tensafe.graph_safety")

OP_NAME = "tensafe::he_lora_delta"
DEVICE_OP_NAME = "tensafe::he_lora_delta_device"
# Part of the compile-cache key: bump when the op's schema or meaning changes.
OP_SCHEMA_VERSION = 3
CACHE_KEY_FIELD = "tensafe"

DUAL_STREAM_ENV = "VLLM_LORA_ENABLE_DUAL_STREAM"
BREAKABLE_ENV = "VLLM_USE_BREAKABLE_CUDAGRAPH"
DISABLE_CACHE_ENV = "VLLM_DISABLE_COMPILE_CACHE"

_EAGER_FIX = "start vLLM with --enforce-eager (no CUDA graphs, no torch.compile)"
_PIECEWISE_FIX = (
    "or leave cudagraph_mode unset (TenSafe then runs vLLM's PIECEWISE graphs with the HE op "
    "outside them), or set -cc.cudagraph_mode=PIECEWISE"
)


@dataclass(frozen=True)
class GraphDecision:
    """What the guard made of a compilation config (logged; the GPU tests read it)."""

    requested: str  # the cudagraph_mode the user asked for, or "unset"
    resolved: str  # what vLLM chose
    final: str  # what the engine runs
    compile_mode: str
    split_added: bool
    cache: str  # how the compile-cache key covers TenSafe
    captured: bool = False  # the device HE op runs inside vLLM's graphs (runtime.HEPlan)
    plan: str = ""  # runtime.HEPlan.describe()

    def describe(self) -> str:
        change = f"{self.resolved} -> {self.final}" if self.resolved != self.final else self.final
        split = f"; {OP_NAME} added to splitting_ops" if self.split_added else ""
        inside = f"; {DEVICE_OP_NAME} runs inside the CUDA graphs" if self.captured else ""
        plan = f"; {self.plan}" if self.plan else ""
        return (
            f"TenSafe graph guard: cudagraph_mode {change} (requested: {self.requested}), "
            f"compilation mode {self.compile_mode}{split}{inside}; compile cache: "
            f"{self.cache}{plan}"
        )


def he_plan(model_device: str | None = None, target_modules: Any = None) -> Any:
    """The HEPlan this vLLM instance's workers will make (runtime.plan_he), from the TenSafe
    settings, the platform's device type and vLLM's --lora-target-modules."""
    from vllm_tensafe.settings import load_settings
    from vllm_tensafe.vllm.runtime import plan_he

    if model_device is None:
        model_device = str(patches.resolve("current_platform").device_type)
    return plan_he(load_settings(), model_device, target_modules)


# --- before vLLM builds its config ------------------------------------------------------------


def refuse_dual_stream() -> None:
    if patches.env_flag(DUAL_STREAM_ENV):
        raise ConfigError(
            f"{DUAL_STREAM_ENV}={os.environ.get(DUAL_STREAM_ENV)} runs LoRA through vLLM's "
            "lora_linear_async, which never calls _apply_lora_to_output, where TenSafe adds "
            "the encrypted delta: encrypted adapters would answer as the base model",
            f"unset {DUAL_STREAM_ENV} (or set it to 0) when TenSafe is enabled",
        )


def precheck_engine_args(engine_args: Any, plan: Any = None) -> None:
    """Refuse what can be refused from the arguments alone, before any engine process starts."""
    refuse_dual_stream()
    if getattr(engine_args, "enforce_eager", False):
        return
    plan = plan or he_plan(target_modules=getattr(engine_args, "lora_target_modules", None))
    if plan.captured:
        return
    requested = _mode_name(getattr(engine_args.compilation_config, "cudagraph_mode", None))
    if requested in ("FULL", "FULL_DECODE_ONLY"):
        raise _full_refusal(requested, requested)
    if patches.env_flag(BREAKABLE_ENV):
        raise _breakable_refusal()


def requested_mode(engine_args: Any) -> str:
    return _mode_name(getattr(engine_args.compilation_config, "cudagraph_mode", None)) or "unset"


# --- after vLLM built it -----------------------------------------------------------------------


def secure_vllm_config(
    vllm_config: Any, requested: str = "unset", plan: Any = None
) -> GraphDecision:
    """Make ``vllm_config``'s compilation settings safe for the HE op, or refuse (ConfigError).

    Runs on the config ``EngineArgs.create_engine_config`` returns, in the process that
    builds the engine, before any engine or worker process exists. ``plan``: the workers'
    HEPlan (default: ``he_plan`` for this config).
    """
    refuse_dual_stream()
    modes = patches.resolve("CUDAGraphMode")
    compile_modes = patches.resolve("CompilationMode")
    cc = vllm_config.compilation_config
    resolved = cc.cudagraph_mode if cc.cudagraph_mode is not None else modes.FULL_AND_PIECEWISE
    if plan is None:
        lora_config = getattr(vllm_config, "lora_config", None)
        plan = he_plan(target_modules=getattr(lora_config, "target_modules", None))
    if plan.captured:
        decision = GraphDecision(
            requested=requested,
            resolved=resolved.name,
            final=resolved.name,
            compile_mode=_mode_name(cc.mode) or "unset",
            split_added=False,
            cache=_key_compile_cache(vllm_config, captured=True),
            captured=True,
            plan=plan.describe(),
        )
        logger.info("%s", decision.describe())
        return decision
    final = resolved
    if resolved.has_full_cudagraphs():
        if resolved != modes.FULL_AND_PIECEWISE:
            raise _full_refusal(requested, resolved.name)
        final = modes.PIECEWISE
        logger.info(
            "TenSafe: CUDA graphs %s -> PIECEWISE: vLLM's FULL decode graphs would capture "
            "%s and replay it without running it, so encrypted adapters would answer as the "
            "base model; PIECEWISE graphs run it eagerly between graph pieces",
            resolved.name,
            OP_NAME,
        )
        cc.cudagraph_mode = final
    split_added = False
    if final != modes.NONE:
        if patches.env_flag(BREAKABLE_ENV):
            raise _breakable_refusal()
        if cc.mode != compile_modes.VLLM_COMPILE:
            raise ConfigError(
                f"cudagraph_mode {final.name} with compilation mode {_mode_name(cc.mode)}: "
                f"only vLLM's own compiler (mode VLLM_COMPILE) splits its graphs at {OP_NAME}",
                f"{_EAGER_FIX}, or leave the compilation mode unset (VLLM_COMPILE)",
            )
        if cc.use_inductor_graph_partition and not op_is_cudagraph_unsafe():
            raise ConfigError(
                "use_inductor_graph_partition=true: Inductor partitions CUDA graphs at ops "
                f"tagged cudagraph_unsafe, and this torch cannot tag {OP_NAME}",
                f"{_EAGER_FIX}, or leave -cc.use_inductor_graph_partition unset (false)",
            )
        if cc.splitting_ops is None:
            raise ConfigError(
                "vLLM built a compilation config without splitting_ops for piecewise CUDA "
                f"graphs, so {OP_NAME} cannot be kept out of them",
                f"{_EAGER_FIX}, or report the vLLM version",
            )
        if OP_NAME not in cc.splitting_ops:
            cc.splitting_ops = [*cc.splitting_ops, OP_NAME]
            split_added = True
    decision = GraphDecision(
        requested=requested,
        resolved=resolved.name,
        final=final.name,
        compile_mode=_mode_name(cc.mode) or "unset",
        split_added=split_added,
        cache=_key_compile_cache(vllm_config),
        plan=plan.describe(),
    )
    logger.info("%s", decision.describe())
    return decision


def cache_key(captured: bool = False) -> dict[str, Any]:
    """What of TenSafe changes the compiled graph: that the op is there, and which op."""
    from vllm_tensafe import __version__

    return {
        "enabled": True,
        "plugin": __version__,
        "op": DEVICE_OP_NAME if captured else OP_NAME,
        "op_schema": OP_SCHEMA_VERSION,
    }


def _key_compile_cache(vllm_config: Any, captured: bool = False) -> str:
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra[CACHE_KEY_FIELD] = cache_key(captured)
        return f"additional_config[{CACHE_KEY_FIELD!r}] is part of its key"
    # A platform-specific additional_config object: its hash is the platform's; turn the
    # cache off rather than risk reusing a graph compiled without the op.
    os.environ[DISABLE_CACHE_ENV] = "1"
    logger.warning(
        "TenSafe: additional_config is a %s, not a dict, so TenSafe cannot enter vLLM's "
        "compile-cache key; set %s=1 (compilation is not cached)",
        type(extra).__name__,
        DISABLE_CACHE_ENV,
    )
    return f"off ({DISABLE_CACHE_ENV}=1)"


# --- in the worker ------------------------------------------------------------------------


def verify_worker_config(vllm_config: Any | None, captured: bool = False) -> None:
    """Refuse a config that did not pass ``secure_vllm_config`` (an engine built some other
    way, e.g. ``AsyncLLM(vllm_config=...)`` from a hand-made VllmConfig). ``captured``: this
    worker's HEPlan runs the device op, which may run inside any CUDA graph."""
    refuse_dual_stream()
    if vllm_config is None:
        logger.warning(
            "TenSafe: no vLLM config is current while the LoRA layers are built, so the "
            "worker cannot re-check the graph settings; the HE op still refuses to run "
            "inside a CUDA graph capture"
        )
        return
    modes = patches.resolve("CUDAGraphMode")
    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    split = OP_NAME in (cc.splitting_ops or ())
    problems = []
    extra = vllm_config.additional_config
    if isinstance(extra, dict) and CACHE_KEY_FIELD not in extra:
        problems.append("it lacks TenSafe's compile-cache key")
    elif isinstance(extra, dict) and extra[CACHE_KEY_FIELD] != cache_key(captured):
        problems.append(
            f"its compile-cache key names {extra[CACHE_KEY_FIELD].get('op')}, this worker runs "
            f"{DEVICE_OP_NAME if captured else OP_NAME}"
        )
    if captured and mode is not None:
        pass  # the device op reads persistent buffers only: any graph mode replays it right
    elif mode is None:
        problems.append("its cudagraph_mode is unresolved")
    elif mode.has_full_cudagraphs():
        problems.append(f"cudagraph_mode {mode.name} captures whole decode steps")
    elif mode != modes.NONE:
        if not split:
            problems.append(f"its piecewise CUDA graphs do not split at {OP_NAME}")
        if patches.env_flag(BREAKABLE_ENV):
            problems.append(f"{BREAKABLE_ENV}=1 captures {OP_NAME}")
    if problems:
        raise ConfigError(
            "this vLLM engine was built from a config that TenSafe's graph guard did not "
            f"see ({'; '.join(problems)}): encrypted adapters could be answered from a CUDA "
            "graph without their delta",
            "build the engine through EngineArgs / AsyncEngineArgs (vllm serve, vllm.LLM, "
            "AsyncLLM.from_engine_args), or pass the VllmConfig through "
            "vllm_tensafe.vllm.graph_safety.secure_vllm_config first",
        )
    if captured:
        logger.info(
            "TenSafe graph check in worker: cudagraph_mode=%s, compilation mode=%s, %s inside "
            "the CUDA graphs",
            _mode_name(mode),
            _mode_name(cc.mode),
            DEVICE_OP_NAME,
        )
        return
    logger.info(
        "TenSafe graph check in worker: cudagraph_mode=%s, compilation mode=%s, %s %s "
        "splitting_ops",
        _mode_name(mode),
        _mode_name(cc.mode),
        OP_NAME,
        "in" if split else "not in",
    )


# --- helpers ------------------------------------------------------------------------------


def op_is_cudagraph_unsafe() -> bool:
    """Whether the registered op carries torch's ``cudagraph_unsafe`` tag (layers.py sets it)."""
    import torch

    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        return False
    namespace = getattr(torch.ops, "tensafe", None)
    op = getattr(namespace, "he_lora_delta", None) if namespace is not None else None
    return op is not None and tag in op.default.tags


def _mode_name(mode: Any) -> str:
    if mode is None:
        return ""
    return str(getattr(mode, "name", mode))


def _full_refusal(requested: str, resolved: str) -> ConfigError:
    where = (
        f"requested with -cc.cudagraph_mode={requested}"
        if requested == resolved
        else f"chosen by vLLM from the other compilation settings (requested: {requested})"
    )
    return ConfigError(
        f"CUDA graph mode {resolved} ({where}) captures whole decode steps, so {OP_NAME} "
        "would be recorded once and replayed without running: encrypted adapters would "
        "answer as the base model",
        f"{_EAGER_FIX}, {_PIECEWISE_FIX}; settings that force FULL graphs (empty "
        "splitting_ops, -cc.pass_config.fuse_attn_quant=true, sequence parallelism) need "
        "changing too",
    )


def _breakable_refusal() -> ConfigError:
    return ConfigError(
        f"{BREAKABLE_ENV}=1 (set by you, or by vLLM for this model) captures the forward pass "
        f"in one stream capture that breaks only at vLLM's own ops, so {OP_NAME} would be "
        "recorded in the graph: encrypted adapters would answer as the base model",
        f"set {BREAKABLE_ENV}=0, or {_EAGER_FIX}",
    )
