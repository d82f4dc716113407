"""The ``vllm-tensafe`` command: keys, packages, the key-holder service, attestation.

One module per command group registers its subcommands through ``add_commands(subparsers)``:

* ``keys``         ``keygen signing | he``
* ``packages``     ``pack``, ``verify``, ``inspect``
* ``key_holder``   ``key-holder serve | cert | token | revoke | unrevoke | status | audit``
* ``attestation``  ``attestation enrol | check-policy | attest``
* ``flags``        ``flags`` (vllm serve's --tensafe-* flags)

This module only assembles them, so ``vllm-tensafe --help`` stays quick (TenSEAL and vLLM are
imported only by the subcommand that runs). Handlers return an exit code; a refusal is a
TenSafeError, printed here as one ``vllm-tensafe: error: ...`` line (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vllm_tensafe import __version__
from vllm_tensafe.cli import attestation, flags, key_holder, keys, packages
from vllm_tensafe.errors import TenSafeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-tensafe",
        description="Make, check and serve encrypted LoRA adapters (TSSP packages) for vLLM. "
        "Serve them with the stock CLI: vllm serve MODEL --enable-tensafe "
        "--lora-modules NAME=NAME.tssp",
    )
    parser.add_argument("--version", action="version", version=f"vllm-tensafe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (keys, packages, key_holder, attestation, flags):
        group.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except TenSafeError as exc:
        print(f"vllm-tensafe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `vllm-tensafe inspect --json | head`: the reader left; that is not an error. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
