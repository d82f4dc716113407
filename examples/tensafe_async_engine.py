"""The original TenSafe guide's engine API over stock vLLM: ``TenSafeAsyncEngine``.

    python examples/tensafe_async_engine.py --model MODEL_DIR --package ADAPTER.tssp \
        --trusted-key owner.pub --he-secret ADAPTER.secret

``TenSafeVLLMConfig`` takes the guide's fields; ``initialize()`` verifies the package and checks
it against the config (a contradiction is refused, never overridden), then starts vLLM's own
``AsyncLLM``; ``generate()`` streams vLLM ``RequestOutput``s from the encrypted adapter.
Streams the answer to stderr, then prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys


async def run(args: argparse.Namespace) -> dict[str, object]:
    from vllm import SamplingParams

    from vllm_tensafe import TenSafeAsyncEngine, TenSafeVLLMConfig

    config = TenSafeVLLMConfig(
        model=args.model,
        max_model_len=512,
        gpu_memory_utilization=0.5,  # small CPU machines; 0.9 on a GPU
        dtype="float32",
        enable_he_lora=True,
        he_lora_adapter_path=args.package,
        he_lora_rank=args.rank,  # optional: checked against the package
        trusted_keys=[args.trusted_key],
        he_secret=args.he_secret,  # local key holder; key_holder="remote" for a remote one
    )
    engine = TenSafeAsyncEngine(config)
    await engine.initialize()
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        steps, final, shown = 0, None, 0
        async for output in engine.generate(args.prompt, "req-001", params):
            text = output.outputs[0].text
            print(text[shown:], end="", file=sys.stderr, flush=True)
            shown, steps, final = len(text), steps + 1, output
        print(file=sys.stderr)
        assert final is not None
        return {
            "text": final.outputs[0].text,
            "token_ids": list(final.outputs[0].token_ids),
            "streamed_steps": steps,
        }
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--package", required=True)
    parser.add_argument("--trusted-key", required=True)
    parser.add_argument("--he-secret", required=True)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # small CPU machines
    # vLLM (and its engine processes) log to stdout by default; stdout is for the JSON.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
