"""Serve an encrypted adapter with vLLM's ``AsyncLLM`` (the engine behind ``vllm serve``).

    python examples/python_async_llm.py --model MODEL_DIR --package ADAPTER.tssp \
        --trusted-key owner.pub --he-secret ADAPTER.secret

Streams the encrypted adapter's answer token by token, then prints it as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os


async def run(args: argparse.Namespace) -> dict[str, object]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=args.model,
            enable_lora=True,
            max_lora_rank=64,
            dtype="float32",
            gpu_memory_utilization=0.5,
            max_model_len=512,
        )
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        lora = LoRARequest("encrypted", 1, args.package)
        steps = 0
        final = None
        async for output in engine.generate(args.prompt, params, "req-1", lora_request=lora):
            steps += 1
            final = output
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
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=10)
    args = parser.parse_args()
    os.environ.update(
        TENSAFE_ENABLED="true",
        TENSAFE_TRUSTED_KEYS=args.trusted_key,
        TENSAFE_HE_SECRET=args.he_secret,
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM (and its engine processes) log to stdout by default; stdout is for the JSON.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
