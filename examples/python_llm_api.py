"""Serve an encrypted adapter with the stock vLLM Python API: ``vllm.LLM`` + ``LoRARequest``.

    python examples/python_llm_api.py --model MODEL_DIR --package ADAPTER.tssp \
        --trusted-key owner.pub --he-secret ADAPTER.secret [--plain-adapter PEFT_DIR]

TenSafe is configured through TENSAFE_* variables (the Python API parses no flags); a .tssp
path in a LoRARequest is then served like any adapter path. With --plain-adapter the same
adapter is also served in plaintext for comparison. Prints one JSON object on stdout (vLLM's
logs go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model folder")
    parser.add_argument("--package", required=True, help="encrypted adapter (.tssp)")
    parser.add_argument("--trusted-key", required=True, help="the adapter owner's .pub")
    parser.add_argument("--he-secret", required=True, help="CKKS secret (local key holder)")
    parser.add_argument("--plain-adapter", help="the same adapter as a PEFT folder")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=10)
    args = parser.parse_args()

    os.environ.update(
        TENSAFE_ENABLED="true",
        TENSAFE_TRUSTED_KEYS=args.trusted_key,
        TENSAFE_HE_SECRET=args.he_secret,
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # small CPU machines
    # vLLM (and its engine processes) log to stdout by default; stdout is for the JSON.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        args.model,
        enable_lora=True,  # TENSAFE_ENABLED would turn it on anyway
        max_lora_rank=64,
        dtype="float32",
        gpu_memory_utilization=0.5,
        max_model_len=512,
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=1, ignore_eos=True)
    requests = {"base": None, "encrypted": LoRARequest("encrypted", 1, args.package)}
    if args.plain_adapter:
        requests["plaintext"] = LoRARequest("plaintext", 2, args.plain_adapter)

    result = {}
    for label, lora_request in requests.items():
        output = llm.generate(args.prompt, params, lora_request=lora_request)[0].outputs[0]
        result[label] = {
            "text": output.text,
            "token_ids": list(output.token_ids),
            "logprobs": [
                lp[tid].logprob for tid, lp in zip(output.token_ids, output.logprobs, strict=True)
            ],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
