"""Tensor roles, one table: what a weight does in a llama-style model, spelled as gguf-py names
its tensors (gguf.TENSOR_NAMES: blk.{bid}.attn_output, token_embd, ...). Theta goes on the block
roles; nkat attribute restores any role; nkat optimize searches which block roles carry theta."""

from __future__ import annotations

import re

from gguf import MODEL_TENSOR, TENSOR_NAMES

_BLOCK_PREFIX = "blk.{bid}."
# The weight matrices of a transformer block that theta corrects: attention q/k/v/output, ffn gate/up/down.
BLOCK_ROLES = tuple(TENSOR_NAMES[t].removeprefix(_BLOCK_PREFIX) for t in (
    MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V, MODEL_TENSOR.ATTN_OUT,
    MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP, MODEL_TENSOR.FFN_DOWN))
# Whole-model weights outside the blocks: the token embedding and the output projection.
MODEL_ROLES = (TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD], TENSOR_NAMES[MODEL_TENSOR.OUTPUT])
ROLES = MODEL_ROLES + BLOCK_ROLES
_BLOCK_WEIGHT = re.compile(r"^blk\.\d+\.([A-Za-z0-9_]+)\.weight$")


def block_role(name: str) -> str | None:
    """The block role of a weight's name (blk.3.attn_output.weight -> attn_output), or None."""
    m = _BLOCK_WEIGHT.match(name)
    return m.group(1) if m and m.group(1) in BLOCK_ROLES else None


def role_globs(roles: list[str]) -> list[str]:
    """Layer globs (nkat convert --selective-layers) that select these block roles."""
    return [f"blk.*.{role}.weight" for role in roles]

# The two ffn input projections, which read the same input and share one type in a mix.
GATE_UP_ROLES = tuple(TENSOR_NAMES[t].removeprefix(_BLOCK_PREFIX) for t in (MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP))
