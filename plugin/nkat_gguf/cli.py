"""Argument parsing only: every subcommand lives in nkat_gguf.commands.<name>.

Each command module has `add_parser(subparsers)`, which registers its parser with
`set_defaults(func=run)`, and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import UserError

COMMANDS = [
    "quickstart",
    "convert",
    "inspect",
    "quantize",
    "models",
    "frontier",
    "attribute",
    "ppl",
    "bench",
    "calibrate",
    "optimize",
    "kobold",
    "doctor",
    "vit",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nkat",
        description="Measure and repair what quantization cost a GGUF model with low-rank INT8 "
        "corrections (theta) stored as standard GGUF LoRA adapters (.nkat).",
    )
    parser.add_argument("--version", action="version", version=f"nkat-gguf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"nkat_gguf.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"nkat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nkat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
