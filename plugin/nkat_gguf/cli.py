"""Argument parsing only: every subcommand lives in nkat_gguf.commands.<name>.

Each command module has `add_parser(subparsers)`, which registers its parser with
`set_defaults(func=run)` (plus `setting_flags`: errors.Setting -> the flag that sets it, where it
differs from commands.common.SETTING_FLAGS, to word errors.BadSetting), and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from . import __version__
from .errors import BadSetting, UserError
from .util.signals import terminate_like_interrupt

COMMANDS = [
    "quickstart",
    "convert",
    "inspect",
    "quantize",
    "models",
    "frontier",
    "attribute",
    "mix",
    "ppl",
    "bench",
    "calibrate",
    "optimize",
    "kobold",
    "doctor",
    "vit",
]


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other user error (its default prints the
    whole usage first: 24 lines for nkat vit train). Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    return dispatch(args, f"nkat {args.command}")


class _OneCommand:
    """Stands in for argparse's subparsers: the command's parser becomes the whole program."""

    def __init__(self, prog: str):
        self.prog = prog
        self.parser: argparse.ArgumentParser | None = None

    def add_parser(self, name, help=None, aliases=(), **kwargs):
        self.parser = Parser(prog=self.prog, **kwargs)
        return self.parser


def run_command(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """One subcommand as a program of its own, named as invoked (backend_selector.py, ...)."""
    holder = _OneCommand(prog or os.path.basename(sys.argv[0]))
    importlib.import_module(f"nkat_gguf.commands.{name}").add_parser(holder)
    args = holder.parser.parse_args(argv)
    args.command = name
    return dispatch(args, holder.prog)


def dispatch(args, program: str) -> int:
    """Run the command: user errors are one line and status 2; SIGINT, SIGTERM and SIGHUP all
    unwind the same way (partial files removed, servers we started stopped), 128 + signal."""
    from .commands.common import SETTING_FLAGS

    args.setting_flags = SETTING_FLAGS | getattr(args, "setting_flags", {})
    try:
        with terminate_like_interrupt():
            return int(args.func(args) or 0)
    except UserError as exc:
        if isinstance(exc, BadSetting):  # named by the flag this command took it from
            exc = exc.worded(args.setting_flags)
        print(f"{program}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"{program}: {what}", file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
