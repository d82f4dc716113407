"""The ``vllm-tensafe`` command: keys, packages and the key-holder service.

Each subcommand lives next to the code it drives and registers itself through
``add_commands(subparsers)``; this module only assembles them, so ``vllm-tensafe --help``
stays quick (TenSEAL and vLLM are imported only by the subcommand that runs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vllm_tensafe import __version__
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
    from vllm_tensafe.tssp import commands as tssp_commands

    tssp_commands.add_commands(subparsers)
    from vllm_tensafe.he import service as key_holder_service

    key_holder_service.add_commands(subparsers)
    from vllm_tensafe import demo

    demo.add_commands(subparsers)
    flags = subparsers.add_parser(
        "flags",
        help="list vllm serve's --tensafe-* flags with their variables and defaults (instant)",
        description="The TenSafe flags of the stock `vllm serve`, as `vllm serve --help=tensafe` "
        "shows them once vLLM has loaded (which takes vLLM a while).",
    )
    flags.set_defaults(handler=_flags)
    return parser


def _flags(args: argparse.Namespace) -> int:
    from vllm_tensafe.plugin import add_tensafe_args

    parser = argparse.ArgumentParser(
        prog="vllm serve", usage="vllm serve MODEL [--enable-tensafe] [--tensafe-* ...]"
    )
    add_tensafe_args(parser)
    parser.print_help()
    return 0


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
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
