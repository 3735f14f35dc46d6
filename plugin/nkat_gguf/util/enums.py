"""String-valued enums: a member is its value wherever a string is expected (JSON, GGUF
metadata, f-strings, comparisons with the plain string), so results stay spelled as before."""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """enum.StrEnum for Python 3.10 too: str(member) is its value."""

    def __str__(self) -> str:
        return str(self.value)

    __format__ = str.__format__
