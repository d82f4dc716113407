"""Reading PEFT adapters: what is accepted, and every refusal names its cause and fix."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vllm_tensafe.errors import TsspError, UnsupportedAdapterError
from vllm_tensafe.tssp.adapter import load_base_config, read_adapter

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def variant(
    src: Path,
    dst: Path,
    config: Callable[[dict[str, Any]], None] | None = None,
    tensors: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        weights = load_file(dst / "adapter_model.safetensors")
        tensors(weights)
        save_file(weights, dst / "adapter_model.safetensors")
    return dst


def test_reads_plain_adapter(adapter_dir: Path, llama_config: dict[str, Any]) -> None:
    adapter = read_adapter(adapter_dir, llama_config)
    assert adapter.rank == 8 and adapter.alpha == 16.0 and adapter.scaling == 2.0
    assert adapter.target_modules == ["q_proj", "v_proj"]
    assert sorted(adapter.modules) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    v = adapter.modules["model.layers.0.self_attn.v_proj"]
    assert q.a.shape == (8, 128) and q.b.shape == (128, 8) and v.b.shape == (64, 8)
    raw = load_file(adapter_dir / "adapter_model.safetensors")
    np.testing.assert_array_equal(q.a, raw[f"{Q0}.lora_A.weight"])


def test_reads_rslora_all_linear(adapter_all_dir: Path, llama_config: dict[str, Any]) -> None:
    adapter = read_adapter(adapter_all_dir, llama_config)
    assert adapter.use_rslora and adapter.scaling == pytest.approx(8 / math.sqrt(4))
    assert len(adapter.target_modules) == 7 and len(adapter.modules) == 14


def test_reads_bf16_and_adapter_name_in_keys(
    adapter_dir: Path, llama_config: dict[str, Any], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file as tload
    from safetensors.torch import save_file as tsave

    dst = shutil.copytree(adapter_dir, tmp_path / "bf16")
    weights = tload(dst / "adapter_model.safetensors")
    renamed = {
        k.replace(".weight", ".default.weight"): v.to(torch.bfloat16) for k, v in weights.items()
    }
    tsave(renamed, dst / "adapter_model.safetensors")
    adapter = read_adapter(dst, llama_config)
    ref = weights[f"{Q0}.lora_A.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(adapter.modules["model.layers.0.self_attn.q_proj"].a, ref)


REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("dora", {"use_dora": True}, "DoRA"),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ("bias_all", {"bias": "all"}, "bias='all'"),
    ("bias_lora_only", {"bias": "lora_only"}, "bias='lora_only'"),
    ("lora_bias", {"lora_bias": True}, "lora_bias"),
    ("lm_head", {"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ("embed", {"target_modules": ["embed_tokens", "q_proj"]}, "embedding"),
    ("rank0", {"r": 0}, "rank r=0"),
    ("rank_neg", {"r": -4}, "rank r=-4"),
    ("rank_str", {"r": "8"}, "rank r=8"),
    ("rank_bool", {"r": True}, "rank r=True"),
    ("rank_float", {"r": 8.0}, "rank r=8.0"),
    ("alpha0", {"lora_alpha": 0}, "lora_alpha=0"),
    ("alpha_neg", {"lora_alpha": -16}, "lora_alpha=-16"),
    ("alpha_nan", {"lora_alpha": float("nan")}, "lora_alpha=nan"),
    ("alpha_inf", {"lora_alpha": float("inf")}, "lora_alpha=inf"),
    ("alpha_str", {"lora_alpha": "16"}, "lora_alpha=16"),
    ("rank_pattern", {"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ("alpha_pattern", {"alpha_pattern": {"v_proj": 32}}, "alpha_pattern"),
    ("not_lora", {"peft_type": "IA3"}, "not LORA"),
    ("pissa", {"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
    ("loftq", {"loftq_config": {"loftq_bits": 4}}, "rewrites the base weights"),
    ("fan_in_fan_out", {"fan_in_fan_out": True}, "fan_in_fan_out"),
    ("layer_replication", {"layer_replication": [[0, 2]]}, "layer_replication"),
    ("trainable_tokens", {"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
]


@pytest.mark.parametrize(("case", "edit", "match"), REFUSALS, ids=[c for c, _, _ in REFUSALS])
def test_config_refusals(
    adapter_dir: Path,
    llama_config: dict[str, Any],
    tmp_path: Path,
    case: str,
    edit: dict[str, Any],
    match: str,
) -> None:
    dst = variant(adapter_dir, tmp_path / case, config=lambda cfg: cfg.update(edit))
    with pytest.raises(UnsupportedAdapterError, match=match) as info:
        read_adapter(dst, llama_config)
    assert info.value.fix  # every refusal says what to do


def test_same_value_patterns_are_harmless(
    adapter_dir: Path, llama_config: dict[str, Any], tmp_path: Path
) -> None:
    dst = variant(
        adapter_dir,
        tmp_path / "same",
        config=lambda c: c.update(rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 16}),
    )
    assert read_adapter(dst, llama_config).rank == 8


def _add(key: str, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda w: w.update({key: np.ones(shape, dtype=np.float32)})


WEIGHT_REFUSALS: list[tuple[str, Callable[[dict[str, np.ndarray]], None], str]] = [
    ("dora_vector", _add(f"{Q0}.lora_magnitude_vector", (128,)), "DoRA"),
    (
        "embedding",
        _add("base_model.model.model.embed_tokens.lora_embedding_A", (8, 512)),
        "embedding",
    ),
    ("lm_head_lora", _add("base_model.model.lm_head.lora_A.weight", (8, 128)), "lm_head"),
    ("saved_module", _add("base_model.model.lm_head.weight", (512, 128)), "not a LoRA factor"),
    (
        "mts_copy",
        _add("base_model.model.lm_head.modules_to_save.default.weight", (512, 128)),
        "modules_to_save",
    ),
    ("lora_b_bias", _add(f"{Q0}.lora_B.bias", (128,)), "lora_B bias"),
    (
        "not_projection",
        _add("base_model.model.model.layers.0.input_layernorm.lora_A.weight", (8, 128)),
        "not a linear projection",
    ),
    ("missing_b", lambda w: w.pop(f"{Q0}.lora_B.weight"), "has no lora_B"),
    (
        "bad_rank_shape",
        lambda w: w.update({f"{Q0}.lora_A.weight": np.ones((4, 128), "f4")}),
        "do not fit rank",
    ),
    (
        "shape_mismatch",
        lambda w: w.update({f"{Q0}.lora_A.weight": np.ones((8, 96), "f4")}),
        r"shape mismatch for LoRA adapter: model.layers.0.self_attn.q_proj expects \(128, 128\), "
        r"package has \(128, 96\)",
    ),
    ("nan_weight", lambda w: w[f"{Q0}.lora_A.weight"].__setitem__((0, 0), np.nan), "non-finite"),
    ("inf_weight", lambda w: w[f"{Q0}.lora_B.weight"].__setitem__((0, 0), np.inf), "non-finite"),
    (
        "int_weight",
        lambda w: w.update({f"{Q0}.lora_A.weight": np.ones((8, 128), "i4")}),
        "floating point",
    ),
]


@pytest.mark.parametrize(
    ("case", "edit", "match"), WEIGHT_REFUSALS, ids=[c for c, _, _ in WEIGHT_REFUSALS]
)
def test_weight_refusals(
    adapter_dir: Path,
    llama_config: dict[str, Any],
    tmp_path: Path,
    case: str,
    edit: Callable[[dict[str, np.ndarray]], None],
    match: str,
) -> None:
    dst = variant(adapter_dir, tmp_path / case, tensors=edit)
    with pytest.raises(UnsupportedAdapterError, match=match):
        read_adapter(dst, llama_config)


def test_layer_beyond_base_model(
    adapter_dir: Path, llama_config: dict[str, Any], tmp_path: Path
) -> None:
    key = "base_model.model.model.layers.7.self_attn.q_proj"
    dst = variant(
        adapter_dir,
        tmp_path / "layer7",
        tensors=lambda w: w.update(
            {
                f"{key}.lora_A.weight": np.ones((8, 128), "f4"),
                f"{key}.lora_B.weight": np.ones((128, 8), "f4"),
            }
        ),
    )
    with pytest.raises(UnsupportedAdapterError, match=r"layers.7.*not a linear projection"):
        read_adapter(dst, llama_config)


def test_pickle_only_is_never_opened(adapter_dir: Path, llama_config: dict, tmp_path: Path) -> None:
    dst = shutil.copytree(adapter_dir, tmp_path / "bin")
    (dst / "adapter_model.safetensors").unlink()
    # Not even a valid pickle: if anything tried to unpickle it, the error would differ.
    (dst / "adapter_model.bin").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(UnsupportedAdapterError, match=r"convert it to safetensors"):
        read_adapter(dst, llama_config)


def test_missing_files(adapter_dir: Path, llama_config: dict, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedAdapterError, match=r"not a folder"):
        read_adapter(tmp_path / "nothing", llama_config)
    dst = shutil.copytree(adapter_dir, tmp_path / "nocfg")
    (dst / "adapter_config.json").unlink()
    with pytest.raises(UnsupportedAdapterError, match=r"adapter_config.json not found"):
        read_adapter(dst, llama_config)
    (dst / "adapter_config.json").write_text("{not json")
    with pytest.raises(UnsupportedAdapterError, match=r"cannot read adapter config"):
        read_adapter(dst, llama_config)
    (dst / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    (dst / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(UnsupportedAdapterError, match=r"cannot read"):
        read_adapter(dst, llama_config)


def test_unsupported_base(adapter_dir: Path, llama_config: dict, tmp_path: Path) -> None:
    gpt2 = {**llama_config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    with pytest.raises(UnsupportedAdapterError, match=r"GPT2LMHeadModel"):
        read_adapter(adapter_dir, gpt2)
    with pytest.raises(UnsupportedAdapterError, match=r"hidden_size"):
        read_adapter(adapter_dir, {k: v for k, v in llama_config.items() if k != "hidden_size"})
    with pytest.raises(TsspError, match=r"config.json not found"):
        load_base_config(tmp_path)
