"""The text as llama.cpp's perplexity and imatrix tools cut it: non-overlapping chunks of n_ctx
tokens from one tokenization of the whole text, BOS first where the vocab adds one."""

from __future__ import annotations

import numpy as np


def chunk_window(runtime, tokens: np.ndarray, n_ctx: int, chunk: int) -> np.ndarray:
    """The tokens the model decodes for chunk `chunk` (a copy: BOS replaces the first token)."""
    start = chunk * n_ctx
    window = tokens[start : start + n_ctx].copy()
    if runtime.add_bos:
        window[0] = runtime.bos_token
    return window
