"""Recipes as llama-quantize's --tensor-type-file: one `pattern=type` token per tensor.

llama-quantize (tools/quantize/quantize.cpp, parse_tensor_type_file) reads whitespace-separated
`pattern=type` tokens, lower-cases the pattern and matches it as a regular expression
(std::regex_search) against each tensor name; the type is a ggml type name, any case. It has no
comment syntax. We write one anchored, escaped pattern per tensor, so each line names exactly one
tensor: `^blk\\.0\\.attn_q\\.weight$=q4_K`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from ..runtime.ggml_quants import ggml_type
from ..util.atomic import write_text_atomic

_ANCHORED = re.compile(r"^\^(.+)\$$")


def exact_pattern(name: str) -> str:
    """A regex that matches this tensor name and no other."""
    return "^" + re.escape(name) + "$"


def write_recipe(path, recipe: dict[str, str]) -> None:
    """recipe: tensor name -> GGML type name."""
    lines = [f"{exact_pattern(n)}={ggml_type(t).name}" for n, t in recipe.items()]
    write_text_atomic(Path(path), "\n".join(lines) + "\n")


def read_recipe(path) -> dict[str, str]:
    """A recipe file written by write_recipe (exact-name patterns) back to tensor name -> type."""
    out = {}
    for token in Path(path).read_text().split():
        pattern, sep, type_name = token.rpartition("=")
        m = _ANCHORED.match(pattern)
        if not sep or not m:
            raise UserError(f"{path}: {token!r} is not an exact-name pattern=type entry")
        name = re.sub(r"\\(.)", r"\1", m.group(1))
        if exact_pattern(name) != pattern:
            raise UserError(f"{path}: {pattern!r} matches more than one exact tensor name")
        out[name] = ggml_type(type_name).name
    return out
