#!/usr/bin/env python3
"""Benchmark a model or a .nkat, with --compare against its base (the guide's inference engine): the same as `nkat bench` (see --help)."""

import sys
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent / "plugin"
if (PLUGIN / "nkat_gguf").is_dir():  # this checkout's package, even when another copy is installed
    sys.path.insert(0, str(PLUGIN))

from nkat_gguf.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
