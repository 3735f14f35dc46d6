"""Helpers shared by several test files, and test-only wrappers around package code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nkat_gguf.runtime import native
from nkat_gguf.runtime.engine import Runtime
from nkat_gguf.theta import lowrank


def chunk_windows(model: Path, text: Path, ctx: int, chunks: int) -> list[np.ndarray]:
    """The first `chunks` windows of `ctx` tokens of `text`, each starting with BOS when the model
    adds one (as the perplexity scorer does)."""
    with Runtime(model, n_ctx=ctx, n_threads=2) as rt:
        toks = rt.tokenize(Path(text).read_bytes())
        bos = rt.bos_token if rt.add_bos else None
    assert len(toks) >= chunks * ctx
    out = []
    for c in range(chunks):
        w = toks[c * ctx:(c + 1) * ctx].copy()
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def factors(E: np.ndarray, rank: int, structure: str, col_scale: np.ndarray | None = None):
    """(B, A) with theta = B @ A for a resolved structure ('general' or 'antisymmetric')."""
    P, Q = lowrank.low_rank(E, rank, col_scale)
    return lowrank.structure_factors(P, Q, structure)


def star_apply(A_q, A_scale, B_q, B_scale, x, y, s, threads=None, *, b_transposed: bool = False) -> np.ndarray:
    """The kernel on plain numpy arrays: y += s * (B_q * B_scale) ((A_q * A_scale) x).

    A_q int8 (rank, n_in), A_scale (rank,), B_q int8 (n_out, rank) -- or (rank, n_out) with
    b_transposed=True, the kernel's own layout, which avoids a copy -- B_scale (n_out,)."""
    A_q = np.ascontiguousarray(A_q, np.int8)
    B_q = np.asarray(B_q, np.int8)
    Bt_q = np.ascontiguousarray(B_q if b_transposed else B_q.T)
    f = native.Int8Factors("", A_q, np.ascontiguousarray(A_scale, np.float32), Bt_q,
                           np.ascontiguousarray(B_scale, np.float32))
    if f.A_scale.shape != (f.rank,) or f.B_scale.shape != (f.n_out,) or Bt_q.shape[0] != f.rank:
        raise ValueError("A_q, A_scale, B_q and B_scale shapes do not match")
    return native.star_apply_factors(f, x, y, s, threads)
