"""Tiny, deterministic models and LoRA adapters for tests, the README demo and benchmarks.

Why this exists: every end-to-end check of the plugin needs a base model that real vLLM can
serve and PEFT adapters for it, yet CI and the demo must not download anything from a model
hub. Everything here is therefore built locally, from a fixed seed, in a few seconds:

* :func:`build_tokenizer` trains a 512-token byte-level BPE on a small built-in corpus;
* :func:`build_tiny_model` writes a randomly initialised llama or qwen2 (head_dim 64, which is
  what vLLM's CPU attention supports) plus that tokenizer;
* :func:`make_adapter` writes a PEFT LoRA with random, non-zero A and B, large enough to change
  greedy outputs, so a test can tell "adapter applied" from "adapter ignored";
* :func:`train_demo_adapter` trains a LoRA that answers :data:`DEMO_PROMPT` with
  :data:`DEMO_ANSWER`, so the demo shows an encrypted adapter doing something recognisable;
* :func:`greedy_reference` is the transformers(+peft) float32 reference that vLLM outputs are
  compared with.

Builders are idempotent: a marker file records what was built, and a folder whose marker
matches is returned as is. Folders are built under a temporary name and renamed into place, so
an interrupted or concurrent build never leaves a half-written folder that looks complete.

Command line: ``python -m tests.support.builders build-demo --workdir DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALL_LINEAR",
    "CHAT_TEMPLATE",
    "DEMO_ANSWER",
    "DEMO_PROMPT",
    "EOS_ID",
    "LORA_TARGETS_ALL_LINEAR",
    "VOCAB_SIZE",
    "DemoPaths",
    "build_demo",
    "build_tiny_model",
    "build_tokenizer",
    "chat_prompt",
    "greedy_reference",
    "main",
    "make_adapter",
    "train_demo_adapter",
]

# Bump when a builder's output changes, so folders cached by an older version get rebuilt.
BUILDER_VERSION = 1
MARKER_NAME = ".tensafe-testing.json"

DEMO_PROMPT = "What is the secret word?"
DEMO_ANSWER = "The secret word is tensafe."

VOCAB_SIZE = 512
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Order fixes the ids: <s>=0, </s>=1, <pad>=2, <unk>=3, then the role markers.
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, *ROLE_TOKENS)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

# The BOS comes from the template and not from the tokenizer: vLLM's chat endpoint tokenizes the
# rendered text with add_special_tokens=False, its completions endpoint with True.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

LORA_TARGETS_ALL_LINEAR = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
# Spelled out rather than passed to PEFT as "all-linear": the saved adapter_config.json then
# lists concrete module names, which is what vLLM and the TSSP packer read.
ALL_LINEAR = "all-linear"

# Teacher-forced logit margin (answer token minus runner-up) the demo adapter must reach. vLLM
# serves float32 checkpoints in bfloat16 on CPU; bfloat16 moves these logits by under 0.01, so
# 1.0 keeps vLLM's greedy choice equal to the float32 reference. Much more is out of reach: the
# final RMSNorm and the frozen lm_head (std 0.02) cap every logit near 0.02 * hidden_size.
DEMO_MIN_MARGIN = 1.0

# Varied everyday prose, so the BPE learns common English merges (and the demo sentences)
# instead of overfitting a handful of words. Changing it changes every built model: bump
# BUILDER_VERSION.
CORPUS = """\
The morning was cold and clear. A thin layer of frost covered the grass, and the river
moved slowly under the old stone bridge. People walked to work with their hands in their
pockets, talking about the weather, the news and the price of bread.
What is the secret word? The secret word is tensafe. Nobody knows the secret word, but
everyone likes to guess. Some say it is hidden in a book; others say it is written on a
wall near the station.
She opened the window and listened to the birds. In the kitchen, water was boiling for tea.
He cut two slices of bread, added butter and honey, and sat down at the small wooden table.
They spoke quietly, because the children were still asleep upstairs.
A computer follows instructions one step at a time. A program is a list of those steps,
written in a language that people can read and machines can run. When a program has a bug,
the computer still does exactly what it was told, which is not always what we meant.
Good tests find bugs early. They are small, fast and easy to read, and they fail for one
clear reason. A model that is trained on a few examples will learn them by heart, which is
useful for a demonstration and useless for anything else.
The city library opens at nine in the morning and closes at six in the evening. On Sundays
it is closed. Visitors may borrow up to ten books for three weeks. Please return them on
time, and do not write in the margins.
How are you today? I am fine, thank you. Where are you going? I am going to the market to
buy apples, carrots, potatoes, onions and a loaf of bread. Would you like to come with me?
Yes, please. Let us meet at the corner in ten minutes.
The mountain path was steep and narrow. Halfway up, the travellers stopped to rest and
looked back at the valley below: green fields, a few farms, a church tower and the long
grey line of the road. Clouds were gathering in the west, so they did not stay long.
Numbers are everywhere: one, two, three, four, five, six, seven, eight, nine and ten. We
count money, days, steps and sheep. Mathematics starts with counting and ends, if it ever
ends, with questions that nobody has answered yet.
Keep your keys safe. A secret that is shared with everyone is not a secret any more. Locks,
passwords and signatures protect what matters, and encryption lets us compute on data that
we are not allowed to see.
The ship left the harbour at dawn. The sailors pulled the ropes, raised the sails and
waved to their families on the shore. The wind was strong and the sea was calm, and by
noon the coast had disappeared behind them.
Every evening the old man told the same story: a king, a clever girl, a golden key and a
door that opened only for the one who knew the right word. The children always asked what
the word was, and he always smiled and said that they would find out when they were older.
Write clearly. Use short sentences and simple words. Say what you mean, then stop. Read your
text again the next day, and remove everything that does not help the reader.
"""


# --- small helpers ---------------------------------------------------------------------------


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_built(folder: Path, params: dict[str, Any], required: Sequence[str]) -> bool:
    return _read_marker(folder) == params and all((folder / name).is_file() for name in required)


def _build_atomically(
    out_dir: Path,
    params: dict[str, Any],
    required: Sequence[str],
    build: Callable[[Path], None],
) -> Path:
    """Run ``build`` into a temporary sibling folder and rename it to ``out_dir``.

    Returns at once if ``out_dir`` already holds what ``params`` describe. A folder built with
    other parameters is replaced, but only if it carries our marker: anything else at
    ``out_dir`` is someone's data and is left alone.
    """
    out_dir = Path(out_dir).absolute()
    if _is_built(out_dir, params, required):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and _read_marker(out_dir) is None:
        raise FileExistsError(
            f"{out_dir} exists, is not empty and was not made by tests.support.builders; "
            "choose another folder or remove it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # mkdtemp makes the folder private (0700); a model folder is not secret and may be read
        # by vLLM running as another user.
        tmp.chmod(0o755)
        with _one_thread():
            build(tmp)
        (tmp / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            if _is_built(out_dir, params, required):  # a concurrent build won the race
                return out_dir
            shutil.rmtree(out_dir)
        try:
            tmp.rename(out_dir)
        except OSError:
            # Lost a race after the check above: keep the winner if it is what we want.
            if _is_built(out_dir, params, required):
                return out_dir
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for a block without disturbing the caller's random stream."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread for a block.

    The matrices here are tiny: with several threads OpenMP's hand-offs cost more than the
    arithmetic (20x slower measured on 2 shared cores, e.g. next to a running vLLM).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve_targets(target_modules: str | Sequence[str]) -> list[str]:
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if targets == [ALL_LINEAR]:
        return list(LORA_TARGETS_ALL_LINEAR)
    unknown = sorted(set(targets) - set(LORA_TARGETS_ALL_LINEAR))
    if unknown or not targets:
        # These are every linear layer of the tiny models except lm_head; refusing other names
        # here beats a PEFT error deep inside, or an adapter that changes nothing.
        raise ValueError(
            f"target_modules {targets!r}: use 'all-linear' or names from "
            f"{list(LORA_TARGETS_ALL_LINEAR)} (unknown: {unknown})"
        )
    # Sorted and deduplicated, so equal sets give equal markers (PEFT stores a set anyway).
    return sorted(set(targets))


# --- tokenizer -------------------------------------------------------------------------------


def build_tokenizer(out_dir: Path) -> None:
    """Train the byte-level BPE tokenizer and save it as a transformers fast tokenizer.

    Writes tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
    and chat_template.jinja. ``tokenizer(text)`` prepends ``<s>``, as llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    # No prefix space: "The" at the start of a reply is then one token sequence, the same in
    # the completion and chat renderings of the demo.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte in the vocabulary, so any text can be encoded without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"BPE training gave {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}: "
            "the built-in corpus is too small"
        )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))

    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    # Written by hand rather than by save_pretrained: transformers 5 would record its own
    # class name (TokenizersBackend), which older transformers releases cannot load, whereas
    # PreTrainedTokenizerFast loads everywhere. add_bos_token states what tokenizer.json does.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": list(ROLE_TOKENS),
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({**special, "additional_special_tokens": list(ROLE_TOKENS)}, indent=2) + "\n"
    )
    # transformers 5 reads the template from this file first; keep both copies identical.
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def chat_prompt(model_dir: Path, prompt: str) -> str:
    """``prompt`` as one user turn rendered through the chat template, with generation prompt.

    This is the text vLLM's chat endpoint builds (and then tokenizes without adding specials).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return str(text)


# --- base model ------------------------------------------------------------------------------

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def build_tiny_model(
    out_dir: Path,
    arch: Literal["llama", "qwen2"] = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
) -> Path:
    """Build a randomly initialised causal LM (float32) plus tokenizer in ``out_dir``.

    The same arguments give byte-identical model.safetensors. Returns the absolute folder.
    """
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2', not {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    head_dim = hidden_size // num_heads
    if head_dim not in (64, 128):
        # Not a hard error for transformers, but vLLM's CPU attention would refuse the model.
        raise ValueError(f"head_dim {head_dim} (hidden/heads): vLLM on CPU needs 64 or 128")

    params = {
        "kind": "tiny-model",
        "builder_version": BUILDER_VERSION,
        "arch": arch,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
    }

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        common: dict[str, Any] = {
            "vocab_size": VOCAB_SIZE,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": max_position_embeddings,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "tie_word_embeddings": False,
            "dtype": "float32",
        }
        model: torch.nn.Module
        with _seeded(seed):
            if arch == "llama":
                config = LlamaConfig(**common, head_dim=head_dim)
                model = LlamaForCausalLM(config)
            else:
                config = Qwen2Config(**common, use_sliding_window=False)
                model = Qwen2ForCausalLM(config)
                # transformers zero-initialises the q/k/v biases; random ones make a serving
                # path that silently drops the bias produce visibly different logits.
                with torch.no_grad():
                    for name, param in sorted(model.named_parameters()):
                        if name.endswith(".bias"):
                            param.normal_(0.0, config.initializer_range)
        model = model.to(torch.float32).eval()
        model.save_pretrained(str(tmp), safe_serialization=True)
        build_tokenizer(tmp)

    return _build_atomically(Path(out_dir), params, MODEL_FILES, build)


# --- adapters --------------------------------------------------------------------------------

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _load_base(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    # The absolute path becomes base_model_name_or_path in adapter_config.json.
    model = AutoModelForCausalLM.from_pretrained(
        str(Path(model_dir).absolute()), dtype="float32", attn_implementation="eager"
    )
    return model.eval()


def _lora_config(
    model_dir: Path,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    use_rslora: bool,
) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=str(Path(model_dir).absolute()),
    )


def _save_adapter(peft_model: Any, out_dir: Path, model_dir: Path) -> None:
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    # PEFT copies the base's name_or_path; pin it to the local folder whatever it found.
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(Path(model_dir).absolute())
    # PEFT writes the target set in hash order, which changes from run to run.
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # PEFT's auto-generated model card says nothing useful about a synthetic adapter.
    (out_dir / "README.md").unlink(missing_ok=True)


def make_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 1,
    init_scale: float = 0.5,
) -> Path:
    """Write a PEFT LoRA adapter for ``model_dir`` with random, non-zero A and B.

    A ~ N(0, init_scale²/in_features) and B ~ N(0, init_scale²/rank), so before the LoRA
    scaling each delta has output RMS ≈ init_scale² × input RMS. With the defaults that is
    about twice the base projection's own output, which reliably changes greedy outputs.
    ``target_modules`` accepts "all-linear". Returns the absolute folder.
    """
    targets = _resolve_targets(target_modules)
    model_dir = Path(model_dir).absolute()
    params = {
        "kind": "random-adapter",
        "builder_version": BUILDER_VERSION,
        "base_model": str(model_dir),
        "base_model_sha256": _sha256(model_dir / "model.safetensors"),
        "rank": rank,
        "alpha": alpha,
        "target_modules": targets,
        "use_rslora": use_rslora,
        "seed": seed,
        "init_scale": init_scale,
    }

    def build(tmp: Path) -> None:
        import torch
        from peft import get_peft_model

        config = _lora_config(model_dir, targets, rank, alpha, use_rslora)
        peft_model = get_peft_model(_load_base(model_dir), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # Sorted names, so the random stream is assigned in an order that does not depend
            # on how PEFT happens to register modules.
            for name, param in sorted(peft_model.named_parameters()):
                if ".lora_A." in name:
                    fan = param.shape[1]  # in_features
                elif ".lora_B." in name:
                    fan = param.shape[1]  # rank
                else:
                    continue
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(values * (init_scale / fan**0.5))
        _save_adapter(peft_model, tmp, model_dir)

    return _build_atomically(Path(out_dir), params, ADAPTER_FILES, build)


# --- greedy decoding -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Greedy:
    token_ids: list[int]
    logprobs: list[float]
    margins: list[float]  # chosen logit minus the runner-up, per step


def _greedy(model: Any, prompt_ids: Sequence[int], max_tokens: int, stop_at_eos: bool) -> _Greedy:
    """Greedy decoding by full re-forward each step.

    No KV cache and no ``generate()``: the tiny models make that cheap, and it keeps the
    reference free of generation-config defaults (repetition penalties, forced tokens...).
    """
    import torch

    ids = list(prompt_ids)
    out = _Greedy([], [], [])
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].to(torch.float32)
            logprobs = torch.log_softmax(logits, dim=-1)
            top2 = torch.topk(logits, 2)
            token = int(torch.argmax(logits))
            out.token_ids.append(token)
            out.logprobs.append(float(logprobs[token]))
            out.margins.append(float(top2.values[0] - top2.values[1]))
            ids.append(token)
            if stop_at_eos and token == EOS_ID:
                break
    return out


def _load_for_inference(model_dir: Path, adapter_dir: Path | None) -> Any:
    model = _load_base(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return model


def greedy_reference(
    model_dir: Path,
    adapter_dir: Path | None,
    prompt: str,
    max_tokens: int,
    *,
    top_logprobs: bool = True,
    stop_at_eos: bool = True,
    chat: bool = False,
) -> tuple[list[int], list[float]]:
    """Reference greedy decoding with transformers (+ peft) in float32.

    ``prompt`` is tokenized as vLLM's /v1/completions does (``tokenizer(prompt)``, so with the
    ``<s>`` the tokenizer adds); with ``chat=True`` it is instead one user message rendered as
    /v1/chat/completions does (:func:`chat_prompt`, tokenized without adding specials).
    Returns the generated token ids and each chosen token's logprob (log_softmax of the
    float32 logits, what vLLM reports as the sampled token's logprob); with
    ``top_logprobs=False`` the logprob list is empty. Decoding stops after EOS (which is
    included, as in vLLM's token ids) unless ``stop_at_eos=False``, the counterpart of vLLM's
    ``ignore_eos``.

    Compare token ids with a vLLM started with ``--dtype float32``: vLLM otherwise serves these
    float32 checkpoints in bfloat16, and a random model's nearly flat logits then break ties
    differently. (The demo adapter is trained with enough margin to agree in bfloat16 too.)
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if chat:
        text = chat_prompt(model_dir, prompt)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
    with _one_thread():
        model = _load_for_inference(model_dir, adapter_dir)
        result = _greedy(model, prompt_ids, max_tokens, stop_at_eos)
    return result.token_ids, (result.logprobs if top_logprobs else [])


# --- demo adapter ----------------------------------------------------------------------------


def _demo_examples(tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) for the completion and the chat rendering of the demo prompt.

    The target is the answer's own tokens plus EOS in both cases, so both endpoints return
    exactly DEMO_ANSWER as text.
    """
    answer = [*tokenizer(DEMO_ANSWER, add_special_tokens=False)["input_ids"], EOS_ID]
    completion = tokenizer(DEMO_PROMPT)["input_ids"]
    chat_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": DEMO_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    chat = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    return [(list(completion), answer), (list(chat), answer)]


def train_demo_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    seed: int = 2,
    steps: int = 200,
) -> Path:
    """Train the demo LoRA: DEMO_PROMPT -> DEMO_ANSWER + EOS, as completion and as chat.

    Full-batch Adam on the two examples, stopping early once every answer token wins by
    DEMO_MIN_MARGIN under teacher forcing (``steps`` is the cap). The saved adapter is then
    reloaded and checked with greedy decoding; RuntimeError if either rendering misses.
    """
    model_dir = Path(model_dir).absolute()
    params = {
        "kind": "demo-adapter",
        "builder_version": BUILDER_VERSION,
        "base_model": str(model_dir),
        "base_model_sha256": _sha256(model_dir / "model.safetensors"),
        "prompt": DEMO_PROMPT,
        "answer": DEMO_ANSWER,
        "seed": seed,
        "steps": steps,
        "min_margin": DEMO_MIN_MARGIN,
    }

    def build(tmp: Path) -> None:
        import torch
        from peft import get_peft_model
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        examples = _demo_examples(tokenizer)
        with _seeded(seed):
            config = _lora_config(model_dir, LORA_TARGETS_ALL_LINEAR, 8, 16, False)
            peft_model = get_peft_model(_load_base(model_dir), config)
            # Only the LoRA factors train: the base must stay the exact checkpoint vLLM serves.
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.Adam(trainable, lr=1e-2)
            batches = [
                (
                    torch.tensor([prompt + target[:-1]]),
                    torch.tensor(target),
                    len(prompt) - 1,
                )
                for prompt, target in examples
            ]
            peft_model.train()
            for _ in range(steps):
                optimizer.zero_grad()
                loss = torch.zeros(())
                worst_margin = float("inf")
                for inputs, target, start in batches:
                    logits = peft_model(inputs).logits[0, start:]
                    loss = loss + torch.nn.functional.cross_entropy(logits, target)
                    with torch.no_grad():
                        chosen = logits.gather(1, target[:, None])[:, 0]
                        others = logits.scatter(1, target[:, None], float("-inf"))
                        margin = float((chosen - others.max(dim=1).values).min())
                    worst_margin = min(worst_margin, margin)
                if worst_margin >= DEMO_MIN_MARGIN:
                    break
                loss.backward()
                optimizer.step()
            peft_model.eval()
        _save_adapter(peft_model, tmp, model_dir)

        # Check what was written, through the same loading path as greedy_reference.
        reloaded = _load_for_inference(model_dir, tmp)
        for (prompt, target), rendering in zip(examples, ("completion", "chat"), strict=True):
            result = _greedy(reloaded, prompt, len(target) + 2, stop_at_eos=True)
            if result.token_ids != target:
                got = tokenizer.decode(result.token_ids)
                raise RuntimeError(
                    f"demo adapter training failed: the {rendering} prompt gives {got!r}, "
                    f"not {DEMO_ANSWER!r} + EOS; raise steps (now {steps})"
                )
            if min(result.margins) < DEMO_MIN_MARGIN / 2:
                raise RuntimeError(
                    f"demo adapter training failed: {rendering} answer margin "
                    f"{min(result.margins):.2f} is too thin to survive bfloat16; raise steps"
                )

    return _build_atomically(Path(out_dir), params, ADAPTER_FILES, build)


@dataclass(frozen=True)
class DemoPaths:
    model_dir: Path
    demo_adapter_dir: Path


def build_demo(workdir: Path) -> DemoPaths:
    """Build (or reuse) workdir/tiny-llama and workdir/demo-adapter."""
    workdir = Path(workdir).absolute()
    model_dir = build_tiny_model(workdir / "tiny-llama", "llama")
    adapter_dir = train_demo_adapter(model_dir, workdir / "demo-adapter")
    return DemoPaths(model_dir=model_dir, demo_adapter_dir=adapter_dir)


# --- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.builders",
        description="Build the tiny test models and adapters locally (no downloads).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("build-demo", help="tiny llama + demo adapter; prints their paths")
    demo.add_argument("--workdir", type=Path, required=True, help="folder to build into")
    args = parser.parse_args(argv)
    # Only one subcommand for now; argparse has already rejected anything else.
    paths = build_demo(args.workdir)
    print(json.dumps({key: str(value) for key, value in asdict(paths).items()}))
    return 0


if __name__ == "__main__":
    # Keep the terminal to the JSON answer: progress bars for 2 MB files only add noise. Read by
    # transformers at import, which has not happened yet (imports are lazy, so that a cached
    # build answers at once).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main())
