"""An importance for token_embd, which llama.cpp quantizes without one.

An imatrix holds E[x^2] per input column of each matrix multiplication. token_embd is read by a
lookup (get_rows), not a multiplication, so no imatrix has an entry for it and llama.cpp rounds it
unweighted (a k-quant with its plain reference routine). Yet the first block reads an embedding
row e only through its attention norm, as gamma * e / rms(e): an error d_j in column j reaches it
as gamma_j * d_j / rms(e). So gamma_j^2 is column j's importance (1 / rms(e)^2 is one constant per
row, and rows are quantized independently).

Given to llama.cpp's quantizer as one more importance entry, it changes the bytes of token_embd
only, in the same type: on Qwen2.5-Coder-1.5B's Q2_K it took 6 % off the KLD (docs/RESULTS.md).

A model without output.weight ties its output to token_embd, which then also multiplies the final
hidden state, with other statistics: no importance is derived for it here.
"""

from __future__ import annotations

import numpy as np

from .gguf_io import open_gguf

EMBEDDING = "token_embd.weight"
FIRST_NORM = "blk.0.attn_norm.weight"
OUTPUT = "output.weight"


def embedding_importance(model: str) -> dict[str, np.ndarray]:
    """{token_embd.weight: blk.0.attn_norm.weight ** 2} as float32, or {} when the model lacks
    either tensor, ties its output to token_embd, or the norm is not as wide as the embedding."""
    tensors = {t.name: t for t in open_gguf(model).tensors}
    if EMBEDDING not in tensors or FIRST_NORM not in tensors or OUTPUT not in tensors:
        return {}
    gamma = np.asarray(tensors[FIRST_NORM].data, dtype=np.float64).reshape(-1)
    if gamma.size != int(tensors[EMBEDDING].shape[0]) or not np.isfinite(gamma).all() or not gamma.any():
        return {}
    return {EMBEDDING: np.ascontiguousarray(gamma ** 2, dtype=np.float32)}
