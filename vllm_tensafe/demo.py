"""``vllm-tensafe demo``: the whole job on an embedded default, end to end.

Builds a tiny Llama and a demo LoRA adapter (seeded, nothing downloaded), makes the owner's keys,
packs the adapter into a signed, encrypted TSSP package, starts the stock ``vllm serve`` with
``--enable-tensafe --lora-modules demo=demo.tssp``, asks the base model and the encrypted
adapter the same question with the official ``openai`` client, prints both, stops the server.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build a tiny model and adapter, serve it encrypted with stock vllm serve, query it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        default="demo-out",
        help="folder for the model, keys, package and server log (default: ./demo-out)",
    )
    parser.add_argument(
        "--keep-server",
        action="store_true",
        help="leave the server running after the answers are printed (Ctrl-C stops it)",
    )
    parser.set_defaults(handler=run_demo)


def _quiet_model_building() -> None:
    # transformers' per-shard progress bars say nothing useful about a 1 MB model.
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _step(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    try:
        from openai import OpenAI
    except ImportError:
        print(
            "vllm-tensafe demo needs the openai client: pip install 'vllm-tensafe[test]'",
            file=sys.stderr,
        )
        return 1
    from vllm_tensafe.cli import main as cli
    from vllm_tensafe.server_process import ServerStartError, VllmServer
    from vllm_tensafe.testing import DEMO_PROMPT, build_demo

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _quiet_model_building()

    _step(f"building the tiny model and the demo adapter in {workdir}")
    paths = build_demo(workdir)

    keys = workdir / "keys"
    keys.mkdir(exist_ok=True)
    owner = keys / "owner"
    if not owner.with_suffix(".key").exists():
        _step("adapter owner: Ed25519 signing key")
        cli(["keygen", "signing", "--out", str(owner)])
    if not owner.with_suffix(".secret").exists():
        _step("adapter owner: CKKS key pair (the secret stays with the key holder)")
        cli(["keygen", "he", "--out", str(owner)])

    package = workdir / "demo.tssp"
    _step("packing the adapter: B encrypted under CKKS, manifest signed")
    code = cli(
        [
            "pack",
            str(paths.demo_adapter_dir),
            "--base-model",
            str(paths.model_dir),
            "--signing-key",
            str(owner.with_suffix(".key")),
            "--he-public",
            str(owner.with_suffix(".public")),
            "-o",
            str(package),
            "--name",
            "demo",
            "--force",
        ]
    )
    if code != 0:
        return code
    cli(["verify", str(package), "--trusted-keys", str(owner.with_suffix(".pub"))])

    served_name = "tiny-llama"
    server = VllmServer(
        paths.model_dir,
        [
            "--served-model-name",
            served_name,
            "--enable-tensafe",
            "--tensafe-trusted-keys",
            str(owner.with_suffix(".pub")),
            "--tensafe-he-secret",
            str(owner.with_suffix(".secret")),
            "--lora-modules",
            f"demo={package}",
            "--max-lora-rank",
            "8",
        ],
        log_path=workdir / "vllm-serve.log",
    )
    _step("starting: vllm serve " + " ".join(server.command[2:]))
    _step(f"(server log: {workdir / 'vllm-serve.log'}; first start takes about a minute)")
    try:
        server.start()
    except ServerStartError as exc:
        print(exc.log[-4000:], file=sys.stderr)
        print(f"[demo] {exc}", file=sys.stderr)
        return 1
    try:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        models = [model.id for model in client.models.list().data]
        _step(f"/v1/models: {models}")
        for model in (served_name, "demo"):
            reply = client.completions.create(
                model=model, prompt=DEMO_PROMPT, max_tokens=16, temperature=0
            )
            label = "base model" if model == served_name else "encrypted adapter 'demo'"
            print(f"\n{label:>26} | prompt: {DEMO_PROMPT!r}")
            print(f"{'':>26} | answer: {reply.choices[0].text!r}")
        print(f"\n{'streaming chat, demo':>26} | ", end="", flush=True)
        stream = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": DEMO_PROMPT}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        _step(f"done in {time.monotonic() - started:.0f}s")
        if args.keep_server:
            _step(f"server still running at {server.base_url} (Ctrl-C to stop)")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
