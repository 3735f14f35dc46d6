"""Output for people (rich tables, progress bars) and for machines (--json)."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Iterable, Sequence

from rich.console import Console
from rich.table import Table

# Piped output gets a wide fixed width so tables are not squeezed into 80 columns.
_console = Console(stderr=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def show_progress(quiet: bool = False) -> bool:
    """Progress bars only on a terminal and never with --quiet."""
    return not quiet and sys.stderr.isatty()


def progress(iterable=None, *, total=None, desc="", quiet=False, unit="it"):
    """A tqdm bar on stderr, disabled when piped or quiet."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show_progress(quiet),
                file=sys.stderr, leave=False, dynamic_ncols=True)


def _clean(value):
    """JSON-safe: NaN/Inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(data) -> str:
    return json.dumps(_clean(data), indent=2, ensure_ascii=False)


def print_json(data) -> None:
    print(to_json(data))


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence], note: str | None = None) -> None:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[fmt(v) for v in row])
    _console.print(table)
    if note:
        _console.print(note)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def say(message: str, quiet: bool = False) -> None:
    """A status line on stderr (keeps stdout clean for --json)."""
    if not quiet:
        print(message, file=sys.stderr)


def cpu_name() -> str:
    """The CPU's model name, named beside every published figure."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
