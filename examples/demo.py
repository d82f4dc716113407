"""The whole job on a tiny model, end to end (``bash scripts/demo.sh``).

Builds a tiny Llama and a demo LoRA adapter (seeded, nothing downloaded), makes the owner's
keys, packs the adapter into a signed, encrypted TSSP package and verifies it, each with the
``vllm-tensafe`` command a user runs (the demo stops at the first one that fails), starts the
stock ``vllm serve`` with ``--enable-tensafe --lora-modules demo=demo.tssp``, asks the base
model and the encrypted adapter the same question with the official ``openai`` client, prints
both, and stops the server.

Needs the ``[test]`` extra (transformers, peft and tokenizers build the tiny model; openai
asks it). Run from the repository root: ``python examples/demo.py [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# The tiny-model builders live with the tests (tests/support/), not in the shipped package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.builders import DEMO_PROMPT, build_demo
from tests.support.server_process import ServerStartError, VllmServer


class StepFailed(Exception):
    """A demo step failed; its own output already says why."""

    def __init__(self, command: list[str], code: int) -> None:
        super().__init__(f"`{shlex.join(command)}` exited with code {code}")
        self.code = code


def step(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def tensafe(*args: str) -> None:
    """Run ``vllm-tensafe ARGS`` as a user would (same interpreter); stop the demo on failure."""
    shown = ["vllm-tensafe", *args]
    step("$ " + shlex.join(shown))
    code = subprocess.run([sys.executable, "-m", "vllm_tensafe.cli", *args], check=False).returncode
    if code != 0:
        raise StepFailed(shown, code)


def make_package(workdir: Path) -> tuple[Path, Path, Path]:
    """Model and adapter, the owner's keys, the verified package: (model, owner prefix, .tssp)."""
    step(f"building the tiny model and the demo adapter in {workdir}")
    paths = build_demo(workdir)
    keys = workdir / "keys"
    keys.mkdir(exist_ok=True)
    owner = keys / "owner"
    if not owner.with_suffix(".key").exists():
        step("adapter owner: Ed25519 signing key")
        tensafe("keygen", "signing", "--out", str(owner))
    if not owner.with_suffix(".secret").exists():
        step("adapter owner: CKKS key pair (the secret stays with the key holder)")
        tensafe("keygen", "he", "--out", str(owner))
    package = workdir / "demo.tssp"
    step("packing the adapter: B encrypted under CKKS, manifest signed")
    tensafe(
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
    )
    step("verifying the package as the host will")
    tensafe("verify", str(package), "--trusted-keys", str(owner.with_suffix(".pub")))
    return paths.model_dir, owner, package


def ask(server: VllmServer, served_name: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    step(f"/v1/models: {[model.id for model in client.models.list().data]}")
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


def run(workdir: Path, keep_server: bool) -> int:
    started = time.monotonic()
    model_dir, owner, package = make_package(workdir)
    served_name = "tiny-llama"
    server = VllmServer(
        model_dir,
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
    step("$ vllm " + shlex.join(server.command[1:]))
    step(f"(server log: {workdir / 'vllm-serve.log'}; first start takes about a minute)")
    try:
        server.start()
    except ServerStartError as exc:
        print(exc.log[-4000:], file=sys.stderr)
        print(f"[demo] {exc}", file=sys.stderr)
        return 1
    try:
        ask(server, served_name)
        step(f"done in {time.monotonic() - started:.0f}s")
        if keep_server:
            step(f"server still running at {server.base_url} (Ctrl-C to stop)")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        default="demo-out",
        type=Path,
        help="folder for the model, keys, package and server log (default: ./demo-out)",
    )
    parser.add_argument(
        "--keep-server",
        action="store_true",
        help="leave the server running after the answers are printed (Ctrl-C stops it)",
    )
    args = parser.parse_args(argv)
    # transformers' per-shard progress bars say nothing useful about a 1 MB model.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(workdir, args.keep_server)
    except StepFailed as exc:
        print(f"[demo] stopped: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
