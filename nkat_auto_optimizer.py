#!/usr/bin/env python3
"""Search rank, gamma, source and layers with Optuna (the guide's auto optimizer): the same as `nkat optimize` (see --help)."""

import sys
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent / "plugin"
if (PLUGIN / "nkat_gguf").is_dir():  # this checkout's package, even when another copy is installed
    sys.path.insert(0, str(PLUGIN))

from nkat_gguf.cli import main

if __name__ == "__main__":
    sys.exit(main(["optimize", *sys.argv[1:]]))
