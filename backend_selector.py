#!/usr/bin/env python3
"""Serve NKAT models with KoboldCpp or llama-cpp-python: the same as `nkat kobold` (see --help)."""

import sys
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent / "plugin"
if (PLUGIN / "nkat_gguf").is_dir():  # this checkout's package, even when another copy is installed
    sys.path.insert(0, str(PLUGIN))

from nkat_gguf.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("kobold", sys.argv[1:]))
