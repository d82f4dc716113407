"""The original TenSafe guide's server API over stock vLLM: ``TenSafeVLLMServer``.

    python examples/tensafe_server.py --model MODEL_DIR --package ADAPTER.tssp \
        --trusted-key owner.pub --he-secret ADAPTER.secret [--port 8000]

Serves vLLM's own OpenAI-compatible app (the adapter as a LoRA named --adapter-name) until
Ctrl-C. ``GET /health`` answers ``{"status": "healthy", "model": ...}`` as in the guide; query the
adapter with examples/openai_chat_stream.py --model ADAPTER_NAME. The stock ``vllm serve
--enable-tensafe`` (examples/serve_local.sh) serves the same thing; this is for programs that
used the guide's API.
"""

from __future__ import annotations

import argparse
import asyncio
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--package", required=True)
    parser.add_argument("--trusted-key", required=True)
    parser.add_argument("--he-secret", required=True)
    parser.add_argument("--adapter-name", default="he-lora")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # small CPU machines

    from vllm_tensafe import TenSafeVLLMConfig, TenSafeVLLMServer

    config = TenSafeVLLMConfig(
        model=args.model,
        max_model_len=512,
        gpu_memory_utilization=0.5,  # small CPU machines; 0.9 on a GPU
        dtype="float32",
        he_lora_adapter_path=args.package,
        adapter_name=args.adapter_name,
        trusted_keys=[args.trusted_key],
        he_secret=args.he_secret,
    )
    # vLLM builds its app inside a running event loop, so the server starts the engine and the
    # app together (the guide's `uvicorn.run(server.app)` cannot work with vLLM's engine client).
    asyncio.run(TenSafeVLLMServer(config).serve(host=args.host, port=args.port))


if __name__ == "__main__":
    main()
