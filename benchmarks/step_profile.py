"""Profile of HE-LoRA decode steps: where the time of one engine step goes.

Runs the stock ``vllm.LLM`` in this process (V1 multiprocessing off, so one profiler sees the
engine, the model and the plugin), once with vLLM's plaintext LoRA and once with the encrypted
package of the same adapter (each in its own child process), greedy, one request at a time.
Reports the prefill time and the decode time per token (whole request minus a prefill-only
request), the decode share inside ``torch.ops.tensafe.he_lora_delta`` split into the delta
engine's phases (products and mask, key holder, unmask) with ciphertext and product counts,
and the top functions by cumulative time of the profiled request.

    python benchmarks/step_profile.py --model qwen0.5b --adapter qv8 --max-tokens 32

JSON on stdout (or --out FILE); a short summary on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import ADAPTERS, MODELS, PROMPT, prepare


def _llm(model: Path, rank: int, **extra: Any) -> Any:
    from vllm import LLM

    return LLM(
        model=str(model),
        dtype="float32",
        max_model_len=512,
        enable_lora=True,
        max_lora_rank=rank,
        max_loras=1,
        max_num_seqs=4,
        enforce_eager=True,
        **extra,
    )


def _run(llm: Any, request: Any, max_tokens: int) -> tuple[float, int]:
    """Seconds and output tokens of one greedy request (ignore_eos: exactly max_tokens)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    out = llm.generate([PROMPT], params, lora_request=request, use_tqdm=False)
    return time.perf_counter() - started, len(out[0].outputs[0].token_ids)


def _he_counters(adapters: list[Any]) -> dict[str, float]:
    if not adapters:
        return {}
    return {"he_seconds": adapters[0].he_seconds, **adapters[0].engine.stats.as_dict()}


def _top(profile: cProfile.Profile, limit: int) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (filename, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}:{func}",
                "calls": calls,
                "tottime_s": round(tottime, 4),
                "cumtime_s": round(cumtime, 4),
            }
        )
    rows.sort(key=lambda r: r["cumtime_s"], reverse=True)
    return rows[:limit]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen0.5b")
    parser.add_argument("--adapter", choices=sorted(ADAPTERS), default="qv8")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--variant",
        choices=("plaintext", "he-local", "both"),
        default="both",
        help="both: one child process per variant (each needs its own vLLM process)",
    )
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="also profile the request with cProfile and list the top functions (its overhead "
        "changes the timings: compare timings from a run without it)",
    )
    parser.add_argument("--top", type=int, default=25, help="functions listed per variant")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    paths = prepare(args.workdir, args.model, args.adapter)
    report: dict[str, Any] = {"model": args.model, "adapter": args.adapter, "variants": {}}
    if args.variant == "both":
        with tempfile.TemporaryDirectory() as tmp:
            for variant in ("plaintext", "he-local"):
                out = Path(tmp) / f"{variant}.json"
                # vLLM logs to stdout: the child writes its JSON to a file.
                subprocess.run(
                    [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--out", out],
                    check=True,
                )
                report["variants"].update(json.loads(out.read_text())["variants"])
        plain = report["variants"]["plaintext"]["decode_ms_per_token"]
        he = report["variants"]["he-local"]["decode_ms_per_token"]
        report["decode_throughput_ratio"] = round(plain / he, 3)
        _write(report, args.out)
        return 0

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rank = ADAPTERS[args.adapter]["rank"]
    for variant in (args.variant,):
        from vllm.lora.request import LoRARequest

        if variant == "plaintext":
            llm = _llm(paths["model"], rank)
            request = LoRARequest("bench", 1, str(paths["adapter"]))
        else:
            keys = paths["keys"]
            os.environ["TENSAFE_ENABLED"] = "1"
            os.environ["TENSAFE_TRUSTED_KEYS"] = str(keys.with_suffix(".pub"))
            os.environ["TENSAFE_HE_SECRET"] = str(keys.with_suffix(".secret"))
            llm = _llm(paths["model"], rank)
            request = LoRARequest("bench", 1, str(paths["package"]))
        _run(llm, request, 4)  # warm-up: adapter load, first shapes
        from vllm_tensafe.vllm import runtime

        adapters = list(runtime.get_runtime().adapters.values()) if variant != "plaintext" else []

        # Prefill alone (one output token), then the whole request: decode = the difference.
        prefill_seconds, _ = _run(llm, request, 1)
        before = _he_counters(adapters)
        prefill_again, _ = _run(llm, request, 1)
        prefill_he = {k: v - before[k] for k, v in _he_counters(adapters).items()}
        before = _he_counters(adapters)
        profile = cProfile.Profile() if args.cprofile else None
        if profile:
            profile.enable()
        seconds, tokens = _run(llm, request, args.max_tokens)
        if profile:
            profile.disable()
        whole_he = {k: v - before[k] for k, v in _he_counters(adapters).items()}
        prefill = min(prefill_seconds, prefill_again)
        steps = max(tokens - 1, 1)
        entry: dict[str, Any] = {
            "tokens": tokens,
            "prefill_ms": round(1000 * prefill, 1),
            "decode_ms_per_token": round(1000 * (seconds - prefill) / steps, 2),
            "cprofile": bool(profile),
        }
        if adapters:
            decode_he = {k: whole_he[k] - prefill_he[k] for k in whole_he}
            entry["decode_he"] = {
                "op_ms_per_token": round(1000 * decode_he["he_seconds"] / steps, 2),
                "products_and_mask_ms_per_token": round(
                    1000 * decode_he["seconds_products"] / steps, 2
                ),
                "key_holder_ms_per_token": round(1000 * decode_he["seconds_key_holder"] / steps, 2),
                "unmask_ms_per_token": round(1000 * decode_he["seconds_unmask"] / steps, 2),
                "ciphertexts_per_token": round(decode_he["ciphertexts_sent"] / steps, 2),
                "products_per_token": round(decode_he["products"] / steps, 2),
                "key_holder_calls_per_token": round(decode_he["decrypt_calls"] / steps, 2),
            }
            entry["prefill_he_op_ms"] = round(1000 * prefill_he["he_seconds"], 1)
        if profile:
            entry["top"] = _top(profile, args.top)
        report["variants"][variant] = entry
        print(f"{variant}: {json.dumps({k: v for k, v in entry.items() if k != 'top'})}",
              file=sys.stderr)  # fmt: skip
        del llm
    _write(report, args.out)
    return 0


def _write(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    raise SystemExit(main())
