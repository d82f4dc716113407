"""Read a PEFT LoRA adapter and refuse everything a TSSP package cannot serve exactly.

A TSSP package can carry exactly one computation per module: delta(x) = s * B (A x) on a
plain linear projection of a Llama/Qwen2/Mistral decoder layer. Anything else PEFT can save
(DoRA's magnitude vector, biases, whole replaced modules, per-module ranks, LoRA on
embeddings or lm_head, base-weight-rewriting initialisations) would be silently dropped or
served wrongly, so it is refused here, at pack time, with the cause and what to do.

Weights are read with the safetensors library only; pickle (.bin) files are never opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_tensafe.errors import TsspError, UnsupportedAdapterError
from vllm_tensafe.tssp.base_model import expected_shape, structural_config
from vllm_tensafe.tssp.manifest import MAX_RANK, MODULE_RE

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_CONFIG_BYTES = 1024 * 1024
_PEFT_PREFIX = "base_model.model."
# PEFT key of a LoRA factor: <module>.lora_A.weight, or <module>.lora_A.<adapter>.weight when
# saved without stripping the adapter name.
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# Config fields whose presence (truthy value) changes the computation beyond s*B*A*x.
_UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA (use_dora=true) rescales the merged weight by a learned magnitude vector",
    "modules_to_save": "modules_to_save replaces whole modules with trained copies",
    "lora_bias": "lora_bias=true adds a trained bias to lora_B",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "layer_replication": "layer_replication changes the base model's layer stack",
    "target_parameters": "target_parameters puts LoRA on raw parameters, not linear modules",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) switches per token",
    "use_qalora": "QA-LoRA (use_qalora=true) pools the input before lora_A",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters per token",
    "kasa_config": "KaSA (kasa_config) adds a learned singular-value scaling",
    "velora_config": "VeLoRA (velora_config) changes the LoRA forward pass",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples LoRA weights",
    "fan_in_fan_out": "fan_in_fan_out=true stores transposed (Conv1D) weights",
}
# Initialisations that rewrite the base weights (the adapter then only fits the rewritten
# base, which the host does not have) unless PEFT converted the adapter when saving it.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraModule:
    name: str  # normalised, e.g. "model.layers.0.self_attn.q_proj"
    a: np.ndarray  # (r, d_in) float64
    b: np.ndarray  # (d_out, r) float64

    @property
    def d_in(self) -> int:
        return int(self.a.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.b.shape[0])


@dataclass(frozen=True)
class PeftAdapter:
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    scaling: float
    target_modules: list[str]
    modules: dict[str, LoraModule]
    base_model_name_or_path: str | None


def _refuse(cause: str, fix: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"unsupported adapter: {cause}", fix)


def _load_json(path: Path, what: str, error: Callable[[str, str], TsspError]) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise error(f"{what} {path} is over {MAX_CONFIG_BYTES} bytes", "check the file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} not found", f"pass a folder that holds {path.name}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"cannot read {what} {path}: {str(exc)[:200]}", "check the file") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} is not a JSON object", "check the file")
    return data


def load_base_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The base model's config.json as a dict (no weights are read)."""
    return _load_json(Path(model_dir) / "config.json", "base model config", TsspError)


def _check_config(cfg: Mapping[str, Any]) -> tuple[int, float, bool]:
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _refuse(f"peft_type is {str(peft_type)[:40]!r}, not LORA", "pack a LoRA adapter")
    for field, why in _UNSUPPORTED_FIELDS.items():
        if cfg.get(field):
            raise _refuse(
                f"{why}; TSSP serves only plain LoRA (delta = s*B*A*x)",
                f"retrain without {field}, or merge the adapter into the base model instead",
            )
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise _refuse(
            f"bias={bias!r} trains base-model biases, which a LoRA package cannot carry",
            'retrain with bias="none"',
        )
    init = cfg.get("init_lora_weights")
    if (isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS)) or cfg.get(
        "loftq_config"
    ):
        raise _refuse(
            f"init_lora_weights={init!r} rewrites the base weights, so the adapter does not fit "
            "the original base model",
            "save the adapter with PEFT's path_initial_model_for_weight_conversion to convert "
            "it to plain LoRA",
        )
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise _refuse(
            f"rank r={str(rank)[:40]} cannot be represented (need an integer 1..{MAX_RANK})",
            "fix r in adapter_config.json",
        )
    alpha = cfg.get("lora_alpha")
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise _refuse(
            f"lora_alpha={str(alpha)[:40]} cannot be represented (need a finite number > 0)",
            "fix lora_alpha in adapter_config.json",
        )
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _refuse(f"use_rslora={use_rslora!r} is not a boolean", "fix adapter_config.json")
    for field, default in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict) or any(v != default for v in pattern.values()):
            raise _refuse(
                f"{field} gives some modules their own rank/alpha; a TSSP package has one "
                "rank and alpha for all modules",
                f"retrain without {field}, or pack each rank group as its own adapter",
            )
    targets = cfg.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for target in names:
        if not isinstance(target, str):
            continue
        # A bare module name (not a regex, not "all-linear") can be refused before any weight
        # is read; regexes are judged by the weights they produced.
        leaf = target.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "embed_tokens", "wte", "embed_out"):
            raise _refuse(
                f"target {target!r} is the {'lm_head' if leaf != 'embed_tokens' else 'embedding'}"
                "; LoRA on embeddings or lm_head is not supported",
                "retrain with target_modules limited to q/k/v/o_proj and gate/up/down_proj",
            )
    return rank, float(alpha), use_rslora


def _classify_key(key: str) -> tuple[str, str]:
    """(normalised module name, "A" | "B") for a LoRA factor key; refuse anything else."""
    fix_targets = "retrain with target_modules limited to q/k/v/o_proj and gate/up/down_proj"
    if "lora_magnitude_vector" in key:
        raise _refuse(
            f"{key} is a DoRA magnitude vector; DoRA is not supported",
            "retrain without use_dora",
        )
    if "lora_embedding_" in key:
        raise _refuse(
            f"{key} is LoRA on an embedding; LoRA on embeddings or lm_head is not supported",
            fix_targets,
        )
    if ".modules_to_save." in key or ".original_module." in key:
        raise _refuse(
            f"{key} is a modules_to_save copy of a whole module",
            "retrain without modules_to_save",
        )
    if re.search(r"\.lora_B(\.[A-Za-z0-9_-]+)?\.bias$", key):
        raise _refuse(f"{key} is a lora_B bias", "retrain with lora_bias=false")
    m = _KEY_RE.match(key)
    if m is None:
        raise _refuse(
            f"tensor {key} is not a LoRA factor (lora_A/lora_B); the adapter carries extra "
            "trained weights (modules_to_save, biases or embeddings)",
            "retrain so that only lora_A/lora_B weights of linear projections are saved",
        )
    module = m.group("module").removeprefix(_PEFT_PREFIX)
    leaf = module.rsplit(".", 1)[-1]
    if leaf in ("lm_head", "embed_tokens"):
        raise _refuse(
            f"{module} is the {'lm_head' if leaf == 'lm_head' else 'embedding'}; LoRA on "
            "embeddings or lm_head is not supported",
            fix_targets,
        )
    if not MODULE_RE.match(module):
        raise _refuse(
            f"target {module} is not a linear projection of the base model's decoder layers",
            fix_targets,
        )
    return module, m.group("which")


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="np") as fh:
            dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
            for key, dtype in dtypes.items():
                if dtype not in _FLOAT_DTYPES:
                    raise _refuse(
                        f"tensor {key} has dtype {dtype}; LoRA factors must be floating point",
                        "save the adapter in float32, float16 or bfloat16",
                    )
                if dtype != "BF16":
                    out[key] = np.asarray(fh.get_tensor(key), dtype=np.float64)
        bf16 = [k for k, d in dtypes.items() if d == "BF16"]
        if bf16:
            # numpy has no bfloat16; torch reads it (still through safetensors, no pickle).
            with safe_open(str(path), framework="pt") as fh:
                for key in bf16:
                    out[key] = fh.get_tensor(key).float().numpy().astype(np.float64)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _refuse(f"cannot read {path}: {str(exc)[:200]}", "check the file") from None
    return out


def read_adapter(
    adapter_dir: str | os.PathLike[str], base_config: Mapping[str, Any]
) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter folder against the base model's config.json."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise _refuse(f"{folder} is not a folder", "pass the PEFT adapter folder")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [name for name in PICKLE_FILES if (folder / name).is_file()]
        if pickles:
            raise _refuse(
                f"{folder} has only {pickles[0]} (a pickle file, which can run code when "
                "loaded, so it is never opened)",
                "convert it to safetensors: load the adapter with PEFT and call "
                "save_pretrained(..., safe_serialization=True)",
            )
        raise _refuse(f"{folder} has no {WEIGHTS_FILE}", "pass a PEFT adapter folder")
    cfg = _load_json(folder / CONFIG_FILE, "adapter config", _refuse)
    rank, alpha, use_rslora = _check_config(cfg)
    structural = structural_config(base_config, error=UnsupportedAdapterError)

    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in _read_tensors(weights).items():
        module, which = _classify_key(key)
        slot = factors.setdefault(module, {})
        if which in slot:
            raise _refuse(f"{module} has two lora_{which} tensors", "check the adapter file")
        slot[which] = tensor
    if not factors:
        raise _refuse(f"{weights} has no LoRA weights", "pass a trained PEFT LoRA adapter")

    modules: dict[str, LoraModule] = {}
    for module in sorted(factors):
        slot = factors[module]
        if set(slot) != {"A", "B"}:
            missing = "lora_B" if "A" in slot else "lora_A"
            raise _refuse(f"{module} has no {missing} tensor", "check the adapter file")
        a, b = slot["A"], slot["B"]
        base_shape = expected_shape(structural, module)
        if base_shape is None:
            raise _refuse(
                f"target {module} is not a linear projection of the base model (it has "
                f"{structural['num_hidden_layers']} layers)",
                "pack against the base model the adapter was trained on",
            )
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise _refuse(
                f"{module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do "
                f"not fit rank r={rank}",
                "check r in adapter_config.json against the saved weights",
            )
        adapter_shape = (int(b.shape[0]), int(a.shape[1]))
        if adapter_shape != base_shape:
            raise UnsupportedAdapterError(
                f"shape mismatch for LoRA adapter: {module} expects {base_shape}, package has "
                f"{adapter_shape}",
                "pack against the base model the adapter was trained on",
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise _refuse(f"{module} has non-finite (NaN/Inf) weights", "retrain the adapter")
        modules[module] = LoraModule(module, a, b)

    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    name_or_path = cfg.get("base_model_name_or_path")
    return PeftAdapter(
        path=folder,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        scaling=scaling,
        target_modules=sorted({m.rsplit(".", 1)[1] for m in modules}),
        modules=modules,
        base_model_name_or_path=name_or_path[:1024] if isinstance(name_or_path, str) else None,
    )
