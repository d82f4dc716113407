"""Serving benchmark: base model vs plaintext LoRA vs HE-LoRA (local and remote key holder).

One run starts the stock ``vllm serve`` once per variant on the same model, adapter and load,
measures output tokens/s, time to first token (TTFT) and inter-token latency (ITL, median and
p99) at each concurrency, and reports every variant's ratio to plaintext LoRA. Models and
adapters are built locally with random weights (nothing is downloaded).

    python benchmarks/serve_bench.py --model tiny --concurrency 1,4 --requests 8
    python benchmarks/serve_bench.py --model qwen0.5b --adapter qv8 --concurrency 1

Prints a short table on stderr and the JSON on stdout (or --out FILE).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from vllm_tensafe.cli import main as tensafe_cli
from vllm_tensafe.server_process import VllmServer, free_port
from vllm_tensafe.testing import build_tiny_model, make_adapter

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
}
ADAPTERS = {
    "qv8": {"rank": 8, "alpha": 16, "target_modules": ("q_proj", "v_proj")},
    "all16": {"rank": 16, "alpha": 32, "target_modules": "all-linear"},
}
VARIANTS = ("base", "plaintext", "he-local", "he-remote")
PROMPT = "Once upon a time in a quiet village by the sea, there lived"


BENCH_TOKEN = "bench-token-0123456789"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def one_request(client: Any, model: str, max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    stamps = []
    tokens = 0
    stream = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
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


def run_load(client: Any, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    one_request(client, model, 4)  # warm-up (adapter load, first compile)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda _: one_request(client, model, max_tokens), range(requests)))
    wall = time.perf_counter() - started
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    itls = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": requests,
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


def prepare(workdir: Path, model_name: str, adapter_name: str) -> dict[str, Path]:
    model = build_tiny_model(workdir / f"model-{model_name}", **MODELS[model_name])
    spec = ADAPTERS[adapter_name]
    adapter = make_adapter(
        model,
        workdir / f"adapter-{model_name}-{adapter_name}",
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


def server_for(variant: str, paths: dict[str, Path], rank: int, kh_port: int | None) -> VllmServer:
    keys = paths["keys"]
    args = ["--served-model-name", "base", "--max-num-seqs", "16"]
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
        if variant == "he-local":
            args += ["--tensafe-he-secret", str(keys.with_suffix(".secret"))]
        else:
            token = keys.parent / "host-token"
            token.write_text(f"{BENCH_TOKEN}\n")
            args += ["--tensafe-key-holder", "remote",
                     "--tensafe-key-holder-url", f"http://127.0.0.1:{kh_port}",
                     "--tensafe-key-holder-token-file", str(token)]  # fmt: skip
    # VLLM_PLUGINS=tensafe also enables the adapter status route, read for the HE op time.
    env = {"VLLM_PLUGINS": "tensafe"} if variant.startswith("he-") else None
    return VllmServer(paths["model"], args, env=env, startup_timeout=900)


def he_counters(base_url: str) -> dict[str, float]:
    """Summed HE counters of the server's encrypted adapters (GET /v1/tensafe/adapters)."""
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/v1/tensafe/adapters", timeout=30) as reply:
        adapters = json.loads(reply.read())["adapters"]
    keys = ("he_seconds", "key_holder_seconds", "he_calls", "ciphertexts_sent")
    return {k: float(sum(a["usage"].get(k, 0) for a in adapters)) for k in keys}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--adapter", choices=sorted(ADAPTERS), default="qv8")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workdir", default="bench-out")
    parser.add_argument("--out", help="write the JSON here as well")
    args = parser.parse_args()

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir, args.model, args.adapter)
    rank = ADAPTERS[args.adapter]["rank"]
    levels = [int(x) for x in args.concurrency.split(",")]
    variants = [v for v in args.variants.split(",") if v]

    service = None
    kh_port = None
    if "he-remote" in variants:
        from vllm_tensafe.he import KeyHolderService, SecretKeySet
        from vllm_tensafe.he.service import AdapterPolicy, TokenStore
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

    from openai import OpenAI

    report: dict[str, Any] = {
        "model": args.model,
        "adapter": args.adapter,
        "max_tokens": args.max_tokens,
        "requests_per_level": args.requests,
        "variants": {},
    }
    try:
        for variant in variants:
            server = server_for(variant, paths, rank, kh_port)
            t0 = time.perf_counter()
            with server:
                startup = time.perf_counter() - t0
                client = OpenAI(base_url=f"{server.base_url}/v1", api_key="x", timeout=3600)
                model = "base" if variant == "base" else "bench"
                results = []
                for c in levels:
                    he = variant.startswith("he-")
                    before = he_counters(server.base_url) if he else {}
                    level = run_load(client, model, c, args.requests, args.max_tokens)
                    if he:
                        after = he_counters(server.base_url)
                        # Includes run_load's short warm-up request; wall is the timed part.
                        spent = after["he_seconds"] - before["he_seconds"]
                        level["he_op_seconds"] = round(spent, 3)
                        level["key_holder_seconds"] = round(
                            after["key_holder_seconds"] - before["key_holder_seconds"], 3
                        )
                        level["he_calls"] = int(after["he_calls"] - before["he_calls"])
                        level["ciphertexts"] = int(
                            after["ciphertexts_sent"] - before["ciphertexts_sent"]
                        )
                    results.append(level)
                report["variants"][variant] = {"startup_s": round(startup, 1), "levels": results}
            print(f"[bench] {variant} done", file=sys.stderr)
    finally:
        if service is not None:
            service.stop()

    plain = report["variants"].get("plaintext")
    for data in report["variants"].values():
        for i, level in enumerate(data["levels"]):
            if plain:
                ref = plain["levels"][i]["output_tokens_per_s"]
                level["throughput_ratio_to_plaintext_lora"] = round(
                    level["output_tokens_per_s"] / ref, 4
                )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    _table(report)
    return 0


def _table(report: dict[str, Any]) -> None:
    print(f"\n{'variant':<10} {'conc':>4} {'tok/s':>8} {'ratio':>6} {'TTFT ms':>8} "
          f"{'ITL p50':>8} {'ITL p99':>8}", file=sys.stderr)  # fmt: skip
    for variant, data in report["variants"].items():
        for level in data["levels"]:
            print(
                f"{variant:<10} {level['concurrency']:>4} {level['output_tokens_per_s']:>8.2f} "
                f"{level.get('throughput_ratio_to_plaintext_lora', float('nan')):>6.2f} "
                f"{level['ttft_median_ms'] or 0:>8.1f} {level['itl_median_ms'] or 0:>8.1f} "
                f"{level['itl_p99_ms'] or 0:>8.1f}",
                file=sys.stderr,
            )


if __name__ == "__main__":
    sys.exit(main())
