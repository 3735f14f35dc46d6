#!/usr/bin/env python3
"""Make theta for a GGUF model (the guide's converter): the same as `nkat convert` (see --help)."""

import sys
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent / "plugin"
if (PLUGIN / "nkat_gguf").is_dir():  # this checkout's package, even when another copy is installed
    sys.path.insert(0, str(PLUGIN))

from nkat_gguf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
