"""Serving benchmark: base model vs plaintext LoRA vs HE-LoRA (local and remote key holder).

One run starts the stock ``vllm serve`` once per variant on the same model, adapter and load
(base is measured on the plaintext LoRA server unless ``--separate-base``; every LoRA variant
gets vLLM's ``--lora-target-modules`` with the adapter's modules, which lets the local key
holder's GPU engine run inside vLLM's CUDA graphs), measures output tokens/s, time to first
token (TTFT) and inter-token latency (ITL, median and p99) at each concurrency (and prompt
length), and reports every variant's ratio to plaintext LoRA, which HE engine and cudagraph mode
each server ran (from its log and the status route). Models and adapters are built locally with
random weights (nothing is downloaded).

    python benchmarks/serve_bench.py --model tiny --concurrency 1,4 --requests 8
    python benchmarks/serve_bench.py --model qwen0.5b --adapter qv8 --concurrency 1

On a GPU, Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads;
the vocabulary is the local tokenizer's) with vLLM's dummy weights (``--load-format dummy``: only
config.json and the tokenizer are written) and a q/v r=16 adapter:

    python benchmarks/serve_bench.py --gpu --model llama8b --out llama8b.json

(defaults for llama8b: adapter qv16, concurrency 1,16, prompts of 32 and 512 tokens, 128 output
tokens, bfloat16). ``--gpu`` drops the CPU-only settings (float32, KV space, 512-token context).

Prints a short table on stderr and the JSON on stdout (or --out FILE).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The tiny-model builders and the server process live with the tests (tests/support/), not in
# the shipped package: make the repository root importable however this script is started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.builders import (
    VOCAB_SIZE,
    build_tiny_model,
    build_tokenizer,
    make_adapter,
)
from tests.support.server_process import VllmServer, free_port
from vllm_tensafe.cli import main as tensafe_cli

MODELS = {
    "tiny": {},
    # Qwen2.5-0.5B's shape (vocabulary aside: the local tokenizer has 512 tokens).
    "qwen0.5b": {
        "arch": "qwen2",
        "hidden_size": 896,
        "num_layers": 24,
        "num_heads": 14,
        "num_kv_heads": 2,
        "intermediate_size": 4864,
        "max_position_embeddings": 2048,
    },
    # Llama-3-8B's shape (vocabulary aside), served with vLLM's dummy weights: no weights file.
    "llama8b": {
        "arch": "llama",
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 8,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "dummy_weights": True,
    },
}
ADAPTERS = {
    "qv8": {"rank": 8, "alpha": 16, "target_modules": ("q_proj", "v_proj")},
    "qv16": {"rank": 16, "alpha": 32, "target_modules": ("q_proj", "v_proj")},
    "all16": {"rank": 16, "alpha": 32, "target_modules": "all-linear"},
}
# Per-model defaults for options left unset.
MODEL_DEFAULTS = {
    "llama8b": {"adapter": "qv16", "concurrency": "1,16", "prompt_tokens": "32,512",
                "max_tokens": 128},
}  # fmt: skip
GPU_ARGS = ("--dtype", "bfloat16", "--max-model-len", "4096", "--gpu-memory-utilization", "0.85")
GPU_ENV = {
    # FlashInfer is not installed on the GPU machine (docs/install.md).
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
VARIANTS = ("base", "plaintext", "he-local", "he-remote")
# Measured only when asked for (--variants): the local key holder with B' decrypted once at bind
# (--tensafe-he-fold-secret) instead of per step.
EXTRA_VARIANTS = ("he-local-folded",)
PROMPT = "Once upon a time in a quiet village by the sea, there lived"


BENCH_TOKEN = "bench-token-0123456789"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def token_prompt(length: int, seed: int = 0) -> list[int]:
    """A prompt of exactly ``length`` token ids (BOS, then ordinary tokens of the local
    tokenizer: ids past the special ones), sent as ids so its length does not depend on how
    text re-tokenises."""
    import random

    rng = random.Random(seed)
    return [0] + [rng.randrange(16, VOCAB_SIZE) for _ in range(length - 1)]


def one_request(
    client: Any, model: str, max_tokens: int, prompt: str | list[int] = PROMPT
) -> dict[str, Any]:
    start = time.perf_counter()
    stamps = []
    tokens = 0
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        # Token ids in every chunk: random weights often generate tokens that decode to no
        # text, and a chunk without text must still count as a token for TTFT and ITL.
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    for chunk in stream:
        if chunk.choices and (
            chunk.choices[0].text or getattr(chunk.choices[0], "token_ids", None)
        ):
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {
        "ttft": stamps[0] - start if stamps else None,
        "itl": [b - a for a, b in itertools.pairwise(stamps)],
        "tokens": tokens,
        "elapsed": end - start,
    }


def run_load(
    client: Any,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt: str | list[int] = PROMPT,
    seconds: float | None = None,
) -> dict:
    """``requests`` requests, ``concurrency`` at a time; with ``seconds``, no request starts
    after that budget (those running finish), so a slow variant cannot eat the whole run.

    A token-id prompt gives every request its own ids of that length (seeded by the request's
    number): with one prompt for all, vLLM's prefix cache would serve every prefill after the
    first, and TTFT would time the cache instead of the model (and the HE op)."""
    one_request(client, model, 4, prompt)  # warm-up (adapter load, first compile)
    started = time.perf_counter()
    deadline = None if seconds is None else started + seconds

    def worker(index: int) -> dict[str, Any] | None:
        if deadline is not None and time.perf_counter() > deadline:
            return None
        own = token_prompt(len(prompt), seed=index + 1) if isinstance(prompt, list) else prompt
        return one_request(client, model, max_tokens, own)

    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = [r for r in pool.map(worker, range(requests)) if r is not None]
    wall = time.perf_counter() - started
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    itls = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "prompt_tokens": len(prompt) if isinstance(prompt, list) else None,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 3),
        "ttft_median_ms": _ms(statistics.median(ttfts) if ttfts else None),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "itl_median_ms": _ms(statistics.median(itls) if itls else None),
        "itl_p99_ms": _ms(percentile(itls, 99)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def build_config_only_model(out_dir: Path, spec: dict[str, Any]) -> Path:
    """config.json and the tokenizer of a Llama-shaped model, no weights (vLLM's
    ``--load-format dummy`` initialises them; ``pack`` reads only config.json). The config is
    written as plain JSON with Llama-3's field names, so any transformers version reads it."""
    out_dir = out_dir.resolve()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_layers"],
        "num_attention_heads": spec["num_heads"],
        "num_key_value_heads": spec["num_kv_heads"],
        "head_dim": spec["hidden_size"] // spec["num_heads"],
        "max_position_embeddings": spec["max_position_embeddings"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if not (out_dir / "tokenizer.json").exists():
        build_tokenizer(out_dir)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def write_random_adapter(
    model_dir: Path, out_dir: Path, rank: int, alpha: float, targets: list[str], seed: int = 1
) -> Path:
    """A PEFT LoRA adapter with random A and B for every targeted module of ``model_dir``,
    its shapes derived from config.json the way pack's base-model binding derives them."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from vllm_tensafe.tssp.base_model import expected_shape, structural_config

    out_dir = out_dir.resolve()
    if (out_dir / "adapter_model.safetensors").exists():
        return out_dir
    structural = structural_config(json.loads((model_dir / "config.json").read_text()))
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(structural["num_hidden_layers"]):
        for target in targets:
            group = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            module = f"model.layers.{layer}.{group}.{target}"
            shape = expected_shape(structural, module)
            assert shape is not None
            d_out, d_in = shape
            key = f"base_model.model.{module}"
            a = rng.normal(size=(rank, d_in)) * (0.5 / d_in**0.5)
            b = rng.normal(size=(d_out, rank)) * (0.5 / rank**0.5)
            tensors[f"{key}.lora_A.weight"] = torch.from_numpy(a.astype(np.float32))
            tensors[f"{key}.lora_B.weight"] = torch.from_numpy(b.astype(np.float32))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": str(model_dir),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def prepare(workdir: Path, model_name: str, adapter_name: str) -> dict[str, Path]:
    spec = ADAPTERS[adapter_name]
    model_spec = {k: v for k, v in MODELS[model_name].items() if k != "dummy_weights"}
    adapter_dir = workdir / f"adapter-{model_name}-{adapter_name}"
    if MODELS[model_name].get("dummy_weights"):
        model = build_config_only_model(workdir / f"model-{model_name}", model_spec)
        targets = spec["target_modules"]
        if isinstance(targets, str):
            from tests.support.builders import LORA_TARGETS_ALL_LINEAR

            targets = LORA_TARGETS_ALL_LINEAR
        adapter = write_random_adapter(model, adapter_dir, spec["rank"], spec["alpha"],
                                       list(targets))  # fmt: skip
    else:
        model = build_tiny_model(workdir / f"model-{model_name}", **model_spec)
        adapter = make_adapter(
            model,
            adapter_dir,
            rank=spec["rank"],
            alpha=spec["alpha"],
            target_modules=spec["target_modules"],
        )
    keys = workdir / "keys" / "owner"
    keys.parent.mkdir(parents=True, exist_ok=True)
    if not keys.with_suffix(".key").exists():
        tensafe_cli(["keygen", "signing", "--out", str(keys)])
    if not keys.with_suffix(".secret").exists():
        tensafe_cli(["keygen", "he", "--out", str(keys)])
    package = workdir / f"{model_name}-{adapter_name}.tssp"
    if not package.exists():
        code = tensafe_cli(
            [
                "pack", str(adapter), "--base-model", str(model),
                "--signing-key", str(keys.with_suffix(".key")),
                "--he-public", str(keys.with_suffix(".public")),
                # One name per package: hosts keep the newest version seen per name.
                "-o", str(package), "--name", f"bench-{model_name}-{adapter_name}",
            ]
        )  # fmt: skip
        if code:
            raise SystemExit(code)
    return {"model": model, "adapter": adapter, "package": package, "keys": keys}


def lora_target_args(adapter_name: str) -> list[str]:
    """vLLM's --lora-target-modules for the adapter's modules: LoRA layers only where the
    adapter is (the same for plaintext and HE variants), and what lets the local key holder's
    GPU engines be built before vLLM captures its CUDA graphs (the HE op then runs inside them)."""
    targets = ADAPTERS[adapter_name]["target_modules"]
    if isinstance(targets, str):
        from tests.support.builders import LORA_TARGETS_ALL_LINEAR

        targets = LORA_TARGETS_ALL_LINEAR
    return ["--lora-target-modules", *targets]


def server_for(
    variant: str,
    paths: dict[str, Path],
    rank: int,
    kh_port: int | None,
    options: argparse.Namespace,
    log_path: Path | None = None,
) -> VllmServer:
    keys = paths["keys"]
    args = ["--served-model-name", "base", "--max-num-seqs", "16"]
    if MODELS[options.model].get("dummy_weights"):
        args += ["--load-format", "dummy"]
    if options.gpu:
        args += list(GPU_ARGS)
    args += shlex.split(options.server_args)
    if variant != "base" and options.lora_target_modules:
        args += lora_target_args(options.adapter)
    if variant == "plaintext":
        args += ["--enable-lora", "--max-lora-rank", str(rank), "--lora-modules",
                 f"bench={paths['adapter']}"]  # fmt: skip
    elif variant.startswith("he-"):
        args += [
            "--enable-tensafe",
            "--tensafe-trusted-keys", str(keys.with_suffix(".pub")),
            "--max-lora-rank", str(rank),
            "--lora-modules", f"bench={paths['package']}",
        ]  # fmt: skip
        if variant in ("he-local", "he-local-folded"):
            args += ["--tensafe-he-secret", str(keys.with_suffix(".secret"))]
            if variant == "he-local-folded":
                args += ["--tensafe-he-fold-secret"]
        else:
            token = keys.parent / "host-token"
            token.write_text(f"{BENCH_TOKEN}\n")
            args += ["--tensafe-key-holder", "remote",
                     "--tensafe-key-holder-url", f"http://127.0.0.1:{kh_port}",
                     "--tensafe-key-holder-token-file", str(token)]  # fmt: skip
        args += shlex.split(options.he_server_args)
    # VLLM_PLUGINS=tensafe also enables the adapter status route, read for the HE op time.
    env = dict(GPU_ENV) if options.gpu else {}
    if variant.startswith("he-"):
        env["VLLM_PLUGINS"] = "tensafe"
    return VllmServer(
        paths["model"], args, env=env or None, startup_timeout=900,
        cpu_defaults=not options.gpu, log_path=log_path,
    )  # fmt: skip


def he_adapters(base_url: str) -> list[dict[str, Any]]:
    """The server's encrypted adapters (GET /v1/tensafe/adapters)."""
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/v1/tensafe/adapters", timeout=30) as reply:
        return json.loads(reply.read())["adapters"]


def he_counters(base_url: str) -> dict[str, float]:
    """Summed HE counters of the server's encrypted adapters."""
    keys = ("he_seconds", "key_holder_seconds", "he_calls", "ciphertexts_sent")
    adapters = he_adapters(base_url)
    return {k: float(sum(a["usage"].get(k, 0) for a in adapters)) for k in keys}


LOG_FACTS = {
    # TenSafe's lines: the graph guard (API server), the worker's check, the engine choice.
    "graph_guard": "TenSafe graph guard:",
    "graph_worker": "TenSafe graph check in worker",
    "he_plan": "TenSafe: HE engine",
    "he_engines": "TenSafe: device HE engines",
    # vLLM's own.
    "vllm_captures": "Capturing CUDA graphs",
    "graph_capturing_finished": "Graph capturing finished",
}


def log_facts(log: str) -> dict[str, list[str]]:
    """Which cudagraph mode and which HE engine a server ran, from its log."""
    lines = log.splitlines()
    return {
        key: sorted({line.split("] ", 1)[-1][:400] for line in lines if needle in line})
        for key, needle in LOG_FACTS.items()
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--adapter", choices=sorted(ADAPTERS), help="default qv8 (llama8b: qv16)")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, of {', '.join(VARIANTS + EXTRA_VARIANTS)} (default: "
        f"{','.join(VARIANTS)})",
    )
    parser.add_argument(
        "--concurrency", help="comma-separated levels (default 1,4,16; llama8b 1,16)"
    )
    parser.add_argument(
        "--requests", type=int, default=16,
        help="requests per level (at least three times the concurrency, so that a level is more "
        "than one wave of requests; default 16)",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, help="output tokens (default 32; llama8b 128)")
    parser.add_argument(
        "--prompt-tokens",
        help="comma-separated prompt lengths in tokens, sent as token ids (default: one short "
        "text prompt; llama8b: 32,512)",
    )
    parser.add_argument(
        "--level-seconds", type=float,
        help="start no request of a level after this many seconds (a slow variant then reports "
        "the requests it finished)",
    )  # fmt: skip
    parser.add_argument(
        "--gpu", action="store_true",
        help="GPU settings (bfloat16, 4096-token context, 85%% of GPU memory) instead of the CPU "
        "ones (float32, 1 GiB KV cache, 512-token context)",
    )  # fmt: skip
    parser.add_argument(
        "--server-args", default="", help="extra vllm serve arguments, all variants"
    )
    parser.add_argument(
        "--he-server-args", default="",
        help="extra vllm serve arguments for the HE variants only (e.g. --enforce-eager)",
    )  # fmt: skip
    parser.add_argument(
        "--he-max-tokens", type=int,
        help="output tokens for the HE variants (default: --max-tokens); tokens/s stay comparable",
    )  # fmt: skip
    parser.add_argument(
        "--he-concurrency",
        help="levels for the HE variants (default: --concurrency), e.g. 1 while the HE work runs "
        "on the CPU",
    )  # fmt: skip
    parser.add_argument(
        "--he-prompt-tokens", help="prompt lengths for the HE variants (default: --prompt-tokens)"
    )
    parser.add_argument(
        "--remote-concurrency",
        help="levels for he-remote only (default: the HE variants'); every token of a remote "
        "step sends one ciphertext per layer and group to the key holder",
    )  # fmt: skip
    parser.add_argument(
        "--remote-prompt-tokens", help="prompt lengths for he-remote only (default: the HE ones)"
    )
    parser.add_argument("--remote-max-tokens", type=int, help="output tokens for he-remote only")
    parser.add_argument(
        "--lora-target-modules", action=argparse.BooleanOptionalAction, default=True,
        help="pass vLLM's --lora-target-modules with the adapter's modules to every LoRA "
        "variant (default on; it lets the GPU HE engine run inside vLLM's CUDA graphs)",
    )  # fmt: skip
    parser.add_argument(
        "--separate-base", action="store_true",
        help="serve base from a server without LoRA (default: from the plaintext LoRA server, "
        "one start less)",
    )  # fmt: skip
    parser.add_argument("--workdir", default="bench-out")
    parser.add_argument("--out", help="write the JSON here as well")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    for key, value in MODEL_DEFAULTS.get(args.model, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.adapter = args.adapter or "qv8"
    args.concurrency = args.concurrency or "1,4,16"
    args.max_tokens = args.max_tokens or 32

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir, args.model, args.adapter)
    rank = ADAPTERS[args.adapter]["rank"]
    levels = [int(x) for x in args.concurrency.split(",")]
    prompts: list[str | list[int]] = (
        [token_prompt(int(n)) for n in args.prompt_tokens.split(",")]
        if args.prompt_tokens
        else [PROMPT]
    )
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS + EXTRA_VARIANTS))
    if unknown:
        raise SystemExit(f"serve_bench: unknown variant(s) {', '.join(unknown)}")

    service = None
    kh_port = None
    if "he-remote" in variants:
        from vllm_tensafe.he import SecretKeySet
        from vllm_tensafe.keyholder import KeyHolderService
        from vllm_tensafe.keyholder.server import AdapterPolicy, TokenStore
        from vllm_tensafe.tssp import TrustStore

        kh_port = free_port()
        trust = TrustStore.from_files([paths["keys"].with_suffix(".pub")])
        service = KeyHolderService(
            SecretKeySet.load(paths["keys"].with_suffix(".secret")),
            AdapterPolicy.from_packages([paths["package"]], trust),
            TokenStore.from_secrets([BENCH_TOKEN]),
            port=kh_port,
            audit_log=workdir / "key-holder-audit.jsonl",
        )
        service.start()

    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "model": args.model,
        "adapter": args.adapter,
        "max_tokens": args.max_tokens,
        "requests_per_level": args.requests,
        "gpu": args.gpu,
        "variants": {},
    }
    try:
        for server_variant, served in server_groups(variants, args.separate_base):
            try:
                results = run_server(
                    server_variant, served, paths, rank, kh_port, args, levels, prompts, workdir
                )
            except Exception as exc:  # keep the other variants' figures (device time is scarce)
                error = {"error": f"{type(exc).__name__}: {exc}"[-4000:]}
                results = {variant: dict(error) for variant in served}
            report["variants"].update(results)
            print(f"[bench] {', '.join(served)} done", file=sys.stderr)
            add_ratios(report)
            write_report(report, args.out)
    finally:
        if service is not None:
            service.stop()
    write_report(report, args.out, final=True)
    _table(report)
    return 0


def server_groups(variants: list[str], separate_base: bool) -> list[tuple[str, list[str]]]:
    """(server variant, variants measured on it): base is measured on the plaintext LoRA
    server unless asked otherwise (vLLM starts take minutes on a GPU)."""
    groups: list[tuple[str, list[str]]] = []
    for variant in variants:
        if variant == "base" and "plaintext" in variants and not separate_base:
            continue
        served = [variant]
        if variant == "plaintext" and "base" in variants and not separate_base:
            served = ["base", "plaintext"]
        groups.append((variant, served))
    return groups


def variant_levels(
    variant: str, args: argparse.Namespace, levels: list[int], prompts: list[str | list[int]]
) -> tuple[list[int], list[str | list[int]], int]:
    """Concurrency levels, prompts and output tokens of one variant."""
    max_tokens = args.max_tokens
    if variant.startswith("he-"):
        if args.he_concurrency:
            levels = [int(x) for x in args.he_concurrency.split(",")]
        if args.he_prompt_tokens:
            prompts = [token_prompt(int(n)) for n in args.he_prompt_tokens.split(",")]
        max_tokens = args.he_max_tokens or max_tokens
    if variant == "he-remote":
        if args.remote_concurrency:
            levels = [int(x) for x in args.remote_concurrency.split(",")]
        if args.remote_prompt_tokens:
            prompts = [token_prompt(int(n)) for n in args.remote_prompt_tokens.split(",")]
        max_tokens = args.remote_max_tokens or max_tokens
    return levels, prompts, max_tokens


def run_server(
    server_variant: str,
    served: list[str],
    paths: dict[str, Path],
    rank: int,
    kh_port: int | None,
    args: argparse.Namespace,
    levels: list[int],
    prompts: list[str | list[int]],
    workdir: Path,
) -> dict[str, dict[str, Any]]:
    server_log = workdir / f"vllm-{args.model}-{server_variant}.log"
    server = server_for(server_variant, paths, rank, kh_port, args, server_log)
    t0 = time.perf_counter()
    from openai import OpenAI

    out: dict[str, dict[str, Any]] = {}
    with server:
        startup = time.perf_counter() - t0
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="x", timeout=3600)
        for variant in served:
            he = variant.startswith("he-")
            variant_level_list, variant_prompts, max_tokens = variant_levels(
                variant, args, levels, prompts
            )
            model = "base" if variant == "base" else "bench"
            results = []
            for c, prompt in itertools.product(variant_level_list, variant_prompts):
                before = he_counters(server.base_url) if he else {}
                level = run_load(
                    client,
                    model,
                    c,
                    max(args.requests, 3 * c),
                    max_tokens,
                    prompt,
                    args.level_seconds,
                )
                if he and before:
                    after = he_counters(server.base_url)
                    # Includes run_load's short warm-up request; wall is the timed part.
                    for key in ("he_seconds", "key_holder_seconds"):
                        level[key.replace("he_seconds", "he_op_seconds")] = round(
                            after.get(key, 0.0) - before.get(key, 0.0), 3
                        )
                    level["he_calls"] = int(after.get("he_calls", 0) - before.get("he_calls", 0))
                    level["ciphertexts"] = int(
                        after.get("ciphertexts_sent", 0) - before.get("ciphertexts_sent", 0)
                    )
                results.append(level)
            entry: dict[str, Any] = {
                "startup_s": round(startup, 1),
                "server": server_variant,
                "max_tokens": max_tokens,
                "server_log": str(server_log),
                "levels": results,
            }
            if he:
                entry["he"] = {
                    a["name"]: {k: a.get(k) for k in ("he_engine", "he_graphs", "usage")}
                    for a in he_adapters(server.base_url)
                }
            out[variant] = entry
        facts = log_facts(server.log())
    for entry in out.values():
        entry["log"] = facts
    return out


def add_ratios(report: dict[str, Any]) -> None:
    """Each level's throughput and TTFT against plaintext LoRA's at the same load (same
    concurrency and prompt)."""
    plain = report["variants"].get("plaintext")
    if not plain or "levels" not in plain:
        return
    reference = {(lv["concurrency"], lv["prompt_tokens"]): lv for lv in plain["levels"]}
    for data in report["variants"].values():
        for level in data.get("levels", []):
            ref = reference.get((level["concurrency"], level["prompt_tokens"]))
            if ref is None:
                continue
            if ref["output_tokens_per_s"]:
                level["throughput_ratio_to_plaintext_lora"] = round(
                    level["output_tokens_per_s"] / ref["output_tokens_per_s"], 4
                )
            if level["ttft_median_ms"] and ref["ttft_median_ms"]:
                level["ttft_ratio_to_plaintext_lora"] = round(
                    level["ttft_median_ms"] / ref["ttft_median_ms"], 3
                )


def write_report(report: dict[str, Any], out: str | None, final: bool = False) -> None:
    """After every variant (a run cut short keeps what it measured) and at the end; also into
    $OUT when set, with the server logs."""
    import os
    import shutil

    text = json.dumps(report, indent=2)
    if final:
        print(text)
    targets = [Path(out)] if out else []
    device_out = os.environ.get("OUT")
    if device_out:
        targets.append(Path(device_out) / f"serve_bench_{report['model']}.json")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")
    if device_out:
        for data in report["variants"].values():
            log = data.get("server_log")
            if log and Path(log).exists():
                shutil.copy(log, Path(device_out) / Path(log).name)


def _table(report: dict[str, Any]) -> None:
    print(f"\n{'variant':<10} {'conc':>4} {'prompt':>6} {'tok/s':>8} {'ratio':>6} "
          f"{'TTFT ms':>8} {'TTFT x':>6} {'ITL p50':>8} {'ITL p99':>8}",
          file=sys.stderr)  # fmt: skip
    for variant, data in report["variants"].items():
        if "error" in data:
            print(f"{variant:<10} failed: {data['error'][-300:]}", file=sys.stderr)
        for level in data.get("levels", []):
            prompt = level.get("prompt_tokens") or "text"
            print(
                f"{variant:<10} {level['concurrency']:>4} {prompt:>6} "
                f"{level['output_tokens_per_s']:>8.2f} "
                f"{level.get('throughput_ratio_to_plaintext_lora', float('nan')):>6.2f} "
                f"{level['ttft_median_ms'] or 0:>8.1f} "
                f"{level.get('ttft_ratio_to_plaintext_lora', float('nan')):>6.2f} "
                f"{level['itl_median_ms'] or 0:>8.1f} "
                f"{level['itl_p99_ms'] or 0:>8.1f}",
                file=sys.stderr,
            )


if __name__ == "__main__":
    sys.exit(main())
