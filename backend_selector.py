#!/usr/bin/env python3
"""Serve NKAT models with KoboldCpp or llama-cpp-python: the same as `nkat kobold` (see --help)."""

import sys
from pathlib import Path

try:
    import nkat_gguf  # noqa: F401
except ImportError:  # running from a checkout without pip install
    sys.path.insert(0, str(Path(__file__).resolve().parent / "plugin"))

from nkat_gguf.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("kobold", sys.argv[1:]))
