"""Budgets as a user states them, turned into bytes: MiB, bits per weight, or the bytes of a
stock llama.cpp type of the same reference."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError

MiB = 1 << 20
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True)
class Budget:
    kind: str  # "mib" | "bpw" | "like"
    value: float | str
    text: str

    @property
    def tag(self) -> str:
        """A file-name-safe label: 300MiB, 4.5bpw, like-Q3_K_S."""
        if self.kind == "mib":
            return f"{self.value:g}MiB"
        if self.kind == "bpw":
            return f"{self.value:g}bpw"
        return f"like-{self.value}"


def parse_budget(text: str, stock_types) -> Budget:
    """'300', '300MiB' / '300M' (MiB), '4.5bpw', or a stock type name such as Q3_K_S."""
    s = str(text).strip()
    if m := re.fullmatch(_NUMBER + r"\s*(m|mb|mib)?", s, re.IGNORECASE):
        value = float(m.group(1))
        kind = "mib"
    elif m := re.fullmatch(_NUMBER + r"\s*bpw", s, re.IGNORECASE):
        value = float(m.group(1))
        kind = "bpw"
    elif s.lower() in stock_types:
        return Budget("like", s.upper(), s)
    else:
        raise UserError(f"budget {text!r}: expected MiB (300 or 300MiB), bits per weight (4.5bpw) or a llama.cpp "
                        f"type ({', '.join(sorted(t.upper() for t in stock_types))})")
    if value <= 0:
        raise UserError(f"budget {text!r} must be positive")
    return Budget(kind, value, s)


def budget_bytes(budget: Budget, n_weights: int, stock_bytes) -> int:
    """Bytes for a budget; stock_bytes(type) gives the file size of llama.cpp's stock type."""
    if budget.kind == "mib":
        return int(budget.value * MiB)
    if budget.kind == "bpw":
        return int(budget.value * n_weights / 8)
    return int(stock_bytes(budget.value))
