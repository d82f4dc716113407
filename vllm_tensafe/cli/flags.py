"""``vllm-tensafe flags``: the ``--tensafe-*`` flags of ``vllm serve``, without loading vLLM."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(subparsers: Any) -> None:
    flags = subparsers.add_parser(
        "flags",
        help="list vllm serve's --tensafe-* flags with their variables and defaults (instant)",
        description="The TenSafe flags of the stock `vllm serve`, as `vllm serve --help=tensafe` "
        "shows them once vLLM has loaded (which takes vLLM a while).",
    )
    flags.set_defaults(handler=_flags)


def _flags(args: argparse.Namespace) -> int:
    from vllm_tensafe.vllm.cli_args import add_tensafe_args

    parser = argparse.ArgumentParser(
        prog="vllm serve", usage="vllm serve MODEL [--enable-tensafe] [--tensafe-* ...]"
    )
    add_tensafe_args(parser)
    parser.print_help()
    return 0
