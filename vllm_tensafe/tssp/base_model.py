"""Base-model binding: which model a package was made for, and the weight shapes it assumes.

The binding is structural: the architecture, the config fields that fix every projection's
shape, a SHA-256 fingerprint of those fields, and the (d_out, d_in) of every targeted base
weight. It catches "wrong model family" and "wrong size" (the mistakes that would otherwise
give garbage or a shape error deep inside vLLM). It does not tell two fine-tunes of the same
architecture apart: that would need a hash of the base weights, which the host would have to
recompute over gigabytes at every start (docs/tssp-format.md says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vllm_tensafe.errors import BaseModelMismatchError, MalformedPackageError, TsspError
from vllm_tensafe.tssp.manifest import MAX_DIM, MODULE_RE, canonical_json

# Decoder-only models whose projections are plain nn.Linear with the shapes below.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_INT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def structural_config(
    config: Mapping[str, Any], error: type[TsspError] = BaseModelMismatchError
) -> dict[str, Any]:
    """The fields of an HF config.json that fix the model's shapes, with defaults resolved.

    Defaults are resolved the way transformers resolves them (num_key_value_heads defaults to
    num_attention_heads, head_dim to hidden_size // num_attention_heads), so a config that
    spells a default out and one that leaves it implicit bind the same.
    """
    if not isinstance(config, Mapping):
        raise error("base model config is not a JSON object", "pass the model's config.json")
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise error(
            "base model config.json has no 'architectures' list",
            "pass the folder of a Hugging Face model (config.json with architectures)",
        )
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise error(
            f"base model architecture {arch[:100]!r} is not supported",
            f"use a {', '.join(SUPPORTED_ARCHITECTURES)} base model",
        )
    out: dict[str, Any] = {"architecture": arch, "model_type": config.get("model_type")}
    if not isinstance(out["model_type"], str):
        raise error("base model config.json has no 'model_type'", "pass a complete config.json")
    raw = dict(config)
    if raw.get("num_key_value_heads") is None:
        raw["num_key_value_heads"] = raw.get("num_attention_heads")
    if raw.get("head_dim") is None:
        hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            raw["head_dim"] = hidden // heads
    for field in _INT_FIELDS:
        value = raw.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIM:
            raise error(
                f"base model config.json field {field!r} is missing or not a positive integer "
                f"(got {str(value)[:40]!r})",
                "pass a complete config.json of a supported model",
            )
        out[field] = value
    return out


def fingerprint(structural: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(dict(structural))).hexdigest()


def expected_shape(structural: Mapping[str, Any], module: str) -> tuple[int, int] | None:
    """(d_out, d_in) of a base projection, or None when the model has no such module."""
    if not MODULE_RE.match(module):
        return None
    m = _LAYER_RE.match(module)
    if m is None or int(m.group(1)) >= structural["num_hidden_layers"]:
        return None
    hidden = structural["hidden_size"]
    q_dim = structural["num_attention_heads"] * structural["head_dim"]
    kv_dim = structural["num_key_value_heads"] * structural["head_dim"]
    inter = structural["intermediate_size"]
    shapes = {
        "q_proj": (q_dim, hidden),
        "k_proj": (kv_dim, hidden),
        "v_proj": (kv_dim, hidden),
        "o_proj": (hidden, q_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    return shapes[module.rsplit(".", 1)[1]]


def make_binding(
    config: Mapping[str, Any], modules: Iterable[str], name_or_path: str | None
) -> dict[str, Any]:
    """The manifest's ``base_model`` section for ``modules`` of the model with ``config``."""
    structural = structural_config(config)
    shapes: dict[str, list[int]] = {}
    for module in modules:
        shape = expected_shape(structural, module)
        if shape is None:
            raise BaseModelMismatchError(
                f"module {module} does not exist in the base model",
                "pack against the base model the adapter was trained on",
            )
        shapes[module] = list(shape)
    return {
        "architecture": structural["architecture"],
        "model_type": structural["model_type"],
        "fingerprint": fingerprint(structural),
        "config": structural,
        "weight_shapes": shapes,
        "name_or_path": name_or_path,
    }


def check_binding(binding: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Raise BaseModelMismatchError unless ``config`` is the model the package was made for.

    Checked in order of usefulness: model family first, then each targeted weight's shape
    (the concrete failure), then any other structural field the fingerprint covers.
    """
    fix = "serve the package on the base model it was packed for, or re-pack it for this one"
    packed: Mapping[str, Any] = binding["config"]
    try:
        actual = structural_config(config)
    except BaseModelMismatchError as exc:
        raise BaseModelMismatchError(
            f"package was made for {binding['architecture']}, but {exc.cause}", fix
        ) from None
    if (actual["architecture"], actual["model_type"]) != (
        binding["architecture"],
        binding["model_type"],
    ):
        raise BaseModelMismatchError(
            f"base model mismatch: package was made for {binding['architecture']} "
            f"(model_type {binding['model_type']}), this model is {actual['architecture']} "
            f"(model_type {actual['model_type']})",
            fix,
        )
    for module, packed_shape in binding["weight_shapes"].items():
        shape = expected_shape(actual, module)
        if shape is None:
            raise BaseModelMismatchError(
                f"shape mismatch for LoRA adapter: {module} does not exist in this base model "
                f"({actual['num_hidden_layers']} layers), package has {tuple(packed_shape)}",
                fix,
            )
        if list(shape) != list(packed_shape):
            raise BaseModelMismatchError(
                f"shape mismatch for LoRA adapter: {module} expects {shape}, package has "
                f"{tuple(packed_shape)}",
                fix,
            )
    if fingerprint(actual) != binding["fingerprint"]:
        differing = sorted(k for k in set(actual) | set(packed) if actual.get(k) != packed.get(k))
        detail = ", ".join(
            f"{k}: package {packed.get(k)!r}, model {actual.get(k)!r}" for k in differing
        )
        raise BaseModelMismatchError(
            f"base model fingerprint mismatch ({detail or 'fingerprint differs'})", fix
        )


def validate_binding(binding: Mapping[str, Any]) -> None:
    """Refuse a manifest whose binding contradicts itself (a signed manifest could still be
    built by a buggy or hostile packer: the host must not trust its fields blindly)."""
    fix = "re-create the package with `vllm-tensafe pack`"
    packed = binding["config"]
    try:
        resolved = structural_config(
            {
                "architectures": [packed.get("architecture")],
                **{k: v for k, v in packed.items() if k != "architecture"},
            },
            error=MalformedPackageError,
        )
    except MalformedPackageError as exc:
        raise MalformedPackageError(f"Invalid TSSP package: {exc.cause}", fix) from None
    if resolved != dict(packed) or fingerprint(packed) != binding["fingerprint"]:
        raise MalformedPackageError(
            "Invalid TSSP package: base-model binding is inconsistent (fields and fingerprint "
            "disagree)",
            fix,
        )
    if (packed["architecture"], packed["model_type"]) != (
        binding["architecture"],
        binding["model_type"],
    ):
        raise MalformedPackageError(
            "Invalid TSSP package: base-model architecture disagrees with its config", fix
        )
    for module, shape in binding["weight_shapes"].items():
        expected = expected_shape(packed, module)
        if expected is None or list(expected) != list(shape):
            raise MalformedPackageError(
                f"Invalid TSSP package: binding lists {module[:100]} with shape {shape}, which "
                "its own config does not give",
                fix,
            )


def local_model_config(model: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The language model's config.json of a local model folder (multimodal configs nest it
    under ``text_config``), or None for a hub id or a folder without one: the worker checks
    the binding against the model vLLM loaded in any case."""
    if not model or not (Path(model) / "config.json").is_file():
        return None
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    return config.get("text_config", config) if isinstance(config, dict) else None
