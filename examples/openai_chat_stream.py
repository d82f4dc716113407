"""Query a vLLM server that serves an encrypted adapter: the ``openai`` client, streaming chat.

    python examples/openai_chat_stream.py --base-url http://127.0.0.1:8000/v1 --model NAME

NAME is the adapter's served name (``--lora-modules NAME=NAME.tssp``); the server is the stock
``vllm serve --enable-tensafe`` (examples/serve_local.sh, examples/remote_key_holder.sh) or
``TenSafeVLLMServer`` (examples/tensafe_server.py). The answer streams to stderr as it arrives;
one JSON line with the whole answer goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="the adapter's served name")
    parser.add_argument("--prompt", default="What is the secret word?")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    from openai import OpenAI

    # vLLM needs no key unless started with --api-key; the client insists on one.
    client = OpenAI(base_url=args.base_url, api_key="not-needed")
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
    )
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(pieces[-1], end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(json.dumps({"model": args.model, "text": "".join(pieces), "chunks": len(pieces)}))


if __name__ == "__main__":
    main()
