"""Tests of the tiny model and adapter builders (tests.support.builders), without vLLM.

The vLLM-facing tests rely on these properties: identical bytes for identical seeds, adapters
that visibly change outputs, and a demo adapter that answers the demo prompt while the base
model does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors import safe_open
from transformers import AutoTokenizer

from tests.support import builders as testing


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def demo(workdir: Path) -> testing.DemoPaths:
    return testing.build_demo(workdir)


def _decode(model_dir: Path, ids: list[int]) -> str:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_same_seed_gives_identical_bytes(workdir: Path, demo: testing.DemoPaths) -> None:
    again = testing.build_tiny_model(workdir / "tiny-llama-again", "llama")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (demo.model_dir / name).read_bytes(), name
    other = testing.build_tiny_model(workdir / "tiny-llama-seed1", "llama", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_build_is_idempotent_and_rebuilds_on_new_params(workdir: Path) -> None:
    out = workdir / "idempotent"
    testing.build_tiny_model(out)
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    testing.build_tiny_model(out)
    assert weights.stat().st_mtime_ns == stamp  # not rewritten
    testing.build_tiny_model(out, seed=5)
    assert json.loads((out / testing.MARKER_NAME).read_text())["seed"] == 5


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        testing.build_tiny_model(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_tokenizer_and_chat_template(demo: testing.DemoPaths) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(demo.model_dir))
    assert len(tokenizer) == testing.VOCAB_SIZE
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert specials == ("<s>", "</s>", "<pad>")
    # The completions endpoint adds BOS through the tokenizer...
    ids = tokenizer(testing.DEMO_PROMPT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == testing.DEMO_PROMPT
    # ...the chat endpoint through the template, then tokenizes without special tokens.
    text = testing.chat_prompt(demo.model_dir, testing.DEMO_PROMPT)
    assert text == f"<s><|user|>\n{testing.DEMO_PROMPT}</s>\n<|assistant|>\n"
    chat_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in chat_ids
    multi = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=False,
    )
    assert multi == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n"
    config = json.loads((demo.model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == testing.CHAT_TEMPLATE


def test_model_config(demo: testing.DemoPaths) -> None:
    config = json.loads((demo.model_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # vLLM CPU attention
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == testing.VOCAB_SIZE
    assert config["eos_token_id"] == testing.EOS_ID


def test_qwen2_has_qkv_bias(workdir: Path) -> None:
    model_dir = testing.build_tiny_model(workdir / "tiny-qwen2", "qwen2")
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen2"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        bias = weights.get_tensor("model.layers.0.self_attn.q_proj.bias")
        assert "model.layers.0.self_attn.o_proj.bias" not in weights.keys()
    assert bias.abs().sum() > 0
    ids, _ = testing.greedy_reference(model_dir, None, "Hello", 4)
    assert len(ids) >= 1


def test_head_dim_16_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_dim"):
        testing.build_tiny_model(tmp_path / "m", hidden_size=64, num_heads=4)


def test_adapter_changes_greedy_output(workdir: Path, demo: testing.DemoPaths) -> None:
    adapter = testing.make_adapter(demo.model_dir, workdir / "random-adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(demo.model_dir)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        b_names = [name for name in weights.keys() if ".lora_B." in name]
        assert b_names and all(weights.get_tensor(name).abs().sum() > 0 for name in b_names)
    prompt = "Once upon a time"
    base_ids, base_logprobs = testing.greedy_reference(demo.model_dir, None, prompt, 8)
    lora_ids, _ = testing.greedy_reference(demo.model_dir, adapter, prompt, 8)
    assert lora_ids != base_ids
    assert len(base_logprobs) == len(base_ids) and all(lp <= 0 for lp in base_logprobs)
    again = testing.make_adapter(demo.model_dir, workdir / "random-adapter-again")
    assert (again / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()


def test_all_linear_and_rslora(workdir: Path, demo: testing.DemoPaths) -> None:
    adapter = testing.make_adapter(
        demo.model_dir, workdir / "all-linear", target_modules="all-linear", use_rslora=True
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(testing.LORA_TARGETS_ALL_LINEAR)
    assert config["use_rslora"] is True
    with pytest.raises(ValueError, match="target_modules"):
        testing.make_adapter(demo.model_dir, workdir / "bad", target_modules=["lm_head"])


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_demo_adapter_answers_and_base_does_not(demo: testing.DemoPaths, chat: bool) -> None:
    prompt = testing.DEMO_PROMPT
    base_ids, _ = testing.greedy_reference(demo.model_dir, None, prompt, 20, chat=chat)
    assert testing.DEMO_ANSWER not in _decode(demo.model_dir, base_ids)
    ids, logprobs = testing.greedy_reference(
        demo.model_dir, demo.demo_adapter_dir, prompt, 20, chat=chat
    )
    assert _decode(demo.model_dir, ids) == testing.DEMO_ANSWER
    assert ids[-1] == testing.EOS_ID and len(logprobs) == len(ids)
    assert all(lp < 0 for lp in logprobs)


def test_demo_adapter_config(demo: testing.DemoPaths) -> None:
    config = json.loads((demo.demo_adapter_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(testing.LORA_TARGETS_ALL_LINEAR)
    assert config["base_model_name_or_path"] == str(demo.model_dir)


def test_cli_prints_paths(demo: testing.DemoPaths, capsys: pytest.CaptureFixture[str]) -> None:
    # Reuses the session's build: the CLI must answer from the markers without rebuilding.
    assert testing.main(["build-demo", "--workdir", str(demo.model_dir.parent)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "model_dir": str(demo.model_dir),
        "demo_adapter_dir": str(demo.demo_adapter_dir),
    }
