"""nkat vit: the vision side (package nkat_vit). Its parsers are torch-free; torch is imported
only when a subcommand runs, and its absence is a one-line error."""

from __future__ import annotations

from ..errors import UserError


def add_parser(subparsers) -> None:
    from nkat_vit.cli import add_parser as add_vit_parser

    add_vit_parser(subparsers, run)


def run(args) -> int:
    try:
        import torch  # noqa: F401  (first: scipy, under sklearn, probes for torch itself)
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"nkat vit needs PyTorch and scikit-learn ({exc.name} is not installed): "
                        "pip install 'nkat-gguf[vit]'") from None
    from nkat_vit.cli import run as run_vit

    return run_vit(args)
