"""Error-propagating (GPTQ-style) quantization of one weight matrix into a llama.cpp type.

GPTQ (Frantar et al., 2022) treats the input autocorrelation R = E[x x^T] of a linear layer as
the Hessian of its squared output error: a row w quantized to q costs (w-q) H (w-q)^T with
H = R + lambda*I. Columns are quantized in order, and each one's rounding error is pushed into the
columns not yet quantized, where it can still be compensated.

Here the unit is a block of the type's length (32 for Q4_0/Q5_0/Q8_0, 256 for k- and i-quants),
quantized for all rows at once by ggml's own routine (ggml_quants.quantize_rows, the block's
diagonal of H as importance), so the bytes are a valid file of that type. Blocks are independent
in every format, so they are processed in order of importance (largest summed diagonal of H
first) and each block's bytes go back to its own place in the row.

The block rule. Let H^-1 = U^T U with U upper triangular (columns in processing order). With the
columns before block B fixed, the free columns S = B + R have the Hessian H_SS, and
(H_SS)^-1 = U_SS^T U_SS (the trailing part of U is the Cholesky factor of the trailing inverse).
Fixing block B at Q_B (error E = W_B - Q_B) and minimising the loss over R gives
    W_R <- W_R - E (H_SS^-1)_BB^-1 (H_SS^-1)_BR = W_R - E U_BB^-1 U_BR,
since (H_SS^-1)_BB = U_BB^T U_BB and (H_SS^-1)_BR = U_BB^T U_BR. U is computed once; no
refactorisation per block.

Damping: H = R + damp * mean(diag R) * I; nearly singular inputs (the gate/up input has eigenvalues
down to 1e-8 of its largest) need it. benchmarks/bench_gptq.py compares dampings by the layer
error on held-out text (WikiText-2 valid split in two halves: H from one, the error under the other).

Inside a k-quant block (Q2_K..Q6_K) GPTQ then goes column by column (round_columns): ggml's
scales for the block stay, each column's code is the nearest under them, and its rounding error is
pushed into the block's columns not yet rounded; the block's total error then goes on by the block
rule (the two are the same update: GPTQ's lazy batches). Other types keep ggml's codes.

Q4_0/Q4_1/Q5_x with importance weights use a statistic of the whole row (its mean square), so a
block quantized as a slice can differ from the same block of the whole row: still a valid block of
the type, only not byte-identical to what ggml writes for the whole row. K- and i-quants are.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import UserError
from . import kquant_codes
from .ggml_quants import block_size, dequantize_rows, ggml_type, quantize_rows, row_bytes

# lambda = DEFAULT_DAMP * mean(diag R), chosen on held-out text: H from 32x512 tokens of WikiText-2
# valid's first half, the layer error under its second half, GPTQ's summed error over ggml's imatrix
# rounding. On the demo model's matrices of every third block (70 Q4_0, 10 Q2_K; bench_gptq.py,
# 2026-12-04), at damp 0.001 / 0.01 / 0.03 / 0.1: Q4_0 0.590 / 0.581 / 0.571 / 0.559, Q2_K 0.807 /
# 0.799 / 0.795 / 0.774; at 0.3 / 1.0: Q4_0 0.569 / 0.617, Q2_K 0.775 / 0.817. (A first sweep on 12 Q4_0
# and 3 Q2_K matrices had put 0.01 first.)
DEFAULT_DAMP = 0.1
# Raised whenever the same inputs give other bytes, so cached GPTQ files are not reused across it
# (2: k-quants rounded column by column inside their blocks).
REVISION = 2
# Columns rounded one by one before the rest of a k-quant block is updated by one product.
_COLUMN_BATCH = 16
# When H + lambda*I is still not positive definite (a nearly singular R), lambda grows by this
# factor, at most _DAMP_RETRIES times.
_DAMP_GROWTH = 10.0
_DAMP_RETRIES = 6


def block_order(diag: np.ndarray, block: int, by_importance: bool = True) -> np.ndarray:
    """Block indices in processing order: largest summed diagonal first (stable), or left to right."""
    n_blocks = diag.size // block
    if not by_importance:
        return np.arange(n_blocks)
    return np.argsort(-diag.reshape(n_blocks, block).sum(axis=1), kind="stable")


def upper_cholesky_of_inverse(H: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U (float64), without forming H^-1."""
    return _upper_factor_of_reversed(np.array(H[::-1, ::-1], dtype=np.float64, order="F"))


def _upper_factor_of_reversed(H_rev: np.ndarray) -> np.ndarray:
    """upper_cholesky_of_inverse of H, given J H J (J reverses the index order), overwritten.

    J H J = M M^T (M lower), so H = V V^T with V = J M J upper, and H^-1 = (V^-1)^T V^-1:
    U = V^-1 = J M^-1 J, a reversed view of M^-1. LAPACK factors and inverts in place (dpotrf,
    dtrtri): one n x n float64 array is the whole peak (H_rev is symmetric, so a C-ordered one is
    passed as its Fortran-ordered transpose). Raises LinAlgError when H is not positive definite."""
    from scipy.linalg import lapack

    M, info = lapack.dpotrf(H_rev.T if H_rev.flags.c_contiguous else H_rev, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"H is not positive definite (dpotrf info {info})")
    M, info = lapack.dtrtri(M, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the Cholesky factor is singular (dtrtri info {info})")
    return M[::-1, ::-1]


def _factor(R: np.ndarray, damp: float, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(diagonal of H in processing order, U of H in processing order, lambda used), growing the
    damping until H is positive definite."""
    R = np.asarray(R)
    base = R.diagonal()[perm].astype(np.float64)
    reverse = perm[::-1]
    damps = [damp] + [max(damp, 1e-6) * _DAMP_GROWTH ** k for k in range(1, _DAMP_RETRIES + 1)]
    for d in damps:
        if d < 0:
            raise UserError(f"damping must be non-negative, not {d}")
        lam = float(d) * float(np.mean(base))
        try:
            return base + lam, _upper_factor_of_reversed(_damped(R, reverse, lam)), lam
        except np.linalg.LinAlgError:
            continue
    raise UserError("the input covariance is not positive definite even with strong damping")


def _damped(R: np.ndarray, order: np.ndarray, lam: float) -> np.ndarray:
    """(R + lam I) with rows and columns in `order`, float64, as one new array."""
    H = np.asarray(R)[np.ix_(order, order)].astype(np.float64, copy=False)
    H[np.diag_indices_from(H)] += lam
    return H


def block_transfers(U: np.ndarray, block: int) -> list[np.ndarray | None]:
    """Per block i, U_BB^-1 U_BR (B: block i's columns, R: the columns after it), the map from
    block i's rounding error to the update of the columns after it (None for the last block).
    It depends on H only: computed once, it serves every matrix and type rounded under H."""
    n = U.shape[0]
    out: list[np.ndarray | None] = []
    for i in range(n // block):
        cols, rest = slice(i * block, (i + 1) * block), slice((i + 1) * block, None)
        out.append(np.linalg.solve(U[cols, cols], U[cols, rest]) if (i + 1) * block < n else None)
    return out


def propagate(W: np.ndarray, U: np.ndarray, block: int, quantize, transfers=None) -> np.ndarray:
    """The GPTQ block loop on W (n_out, n) float64, columns already in processing order.

    quantize(i, values) -> the dequantized block i (same shape as values). Each block's error is
    pushed into the columns after it through U (H^-1 = U^T U), or through `transfers`
    (block_transfers of U, the same products computed before). W is updated in place and
    returned: column block i holds, at the end, the values block i was quantized from."""
    n = W.shape[1]
    for i in range(n // block):
        cols = slice(i * block, (i + 1) * block)
        E = W[:, cols] - np.asarray(quantize(i, W[:, cols]), dtype=np.float64)
        if (i + 1) * block < n:
            rest = slice((i + 1) * block, None)
            W[:, rest] -= E @ (transfers[i] if transfers is not None else np.linalg.solve(U[cols, cols], U[cols, rest]))
    return W


def round_columns(qtype, blocks: np.ndarray, values: np.ndarray, U: np.ndarray) -> np.ndarray:
    """GPTQ column by column inside one k-quant block: blocks (n_out, block_bytes) are ggml's
    quantization of values (n_out, 256), whose scales are kept; U (256, 256) is the block's part of
    the upper factor of H^-1. Each column takes the code nearest its current value, and its error
    e = (v - q) / U[c, c] updates the later columns by -e U[c, later]: within a batch of
    _COLUMN_BATCH columns at once, beyond it by one product per batch. Returns the new blocks."""
    step, offset = (a.T.copy() for a in kquant_codes.affine(qtype, blocks))
    top = (1 << kquant_codes.layout(qtype).bits) - 1
    ggml_codes = kquant_codes.codes_of(qtype, blocks).T
    V = np.array(values, dtype=np.float64).T  # a column of the block is a contiguous row here
    n = V.shape[0]
    codes = np.empty(V.shape, dtype=np.int32)
    for start in range(0, n, _COLUMN_BATCH):
        stop = min(start + _COLUMN_BATCH, n)
        errors = np.empty((stop - start, V.shape[1]))
        for c in range(start, stop):
            usable = step[c] != 0  # a zero scale: every code gives the same value; keep ggml's
            nearest = np.rint((V[c] - offset[c]) / np.where(usable, step[c], 1.0))
            codes[c] = np.where(usable, np.clip(nearest, 0, top), ggml_codes[c])
            errors[c - start] = (V[c] - (step[c] * codes[c] + offset[c])) / U[c, c]
            V[c + 1:stop] -= np.outer(U[c, c + 1:stop], errors[c - start])
        V[stop:] -= U[start:stop, stop:].T @ errors
    return kquant_codes.with_codes(qtype, blocks, codes.T)


@dataclass
class GptqFactor:
    """What GPTQ needs of one input covariance at one block length; the same for every matrix
    that reads that input (q/k/v, gate/up) and every type of that block length."""
    block: int
    order: np.ndarray       # block indices in processing order
    importance: np.ndarray  # diagonal of H in processing order (float32), ggml's importance
    U: np.ndarray           # H^-1 = U^T U, processing order
    lam: float              # the damping lambda used

    @property
    def perm(self) -> np.ndarray:
        """Column indices in processing order."""
        return column_order(self.order, self.block)

    @cached_property
    def transfers(self) -> list[np.ndarray | None]:
        """block_transfers of U, made on first use (the widest input's: about 320 MB)."""
        return block_transfers(self.U, self.block)


def column_order(order: np.ndarray, block: int) -> np.ndarray:
    return (order[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def gptq_factor(R: np.ndarray, block: int, damp: float = DEFAULT_DAMP, by_importance: bool = True) -> GptqFactor:
    """The block order and the factor of H = R + lambda*I for blocks of `block` columns."""
    order = block_order(np.diag(np.asarray(R, dtype=np.float64)), block, by_importance)
    h_diag, U, lam = _factor(R, damp, column_order(order, block))
    return GptqFactor(block, order, h_diag.astype(np.float32), U, lam)


def gptq_quantize_matrix(W: np.ndarray, R: np.ndarray | None, qtype, damp: float = DEFAULT_DAMP,
                         by_importance: bool = True, use_importance: bool = True,
                         threads: int | None = None, info: dict | None = None,
                         factor: GptqFactor | None = None, columns: bool = True) -> np.ndarray:
    """W (n_out, n_in) quantized to qtype with GPTQ block propagation under H = R + lambda*I.

    R: the input autocorrelation E[x x^T] (n_in, n_in); or factor: gptq_factor of it at this type's
    block length, computed once for several matrices or types (then R, damp and by_importance are
    not used). Returns (n_out, row_bytes) uint8: the rows exactly as ggml lays them out, readable
    by dequantize_rows and llama.cpp.
    use_importance: pass the block's diagonal of H to ggml as importance (else ggml's plain rounding).
    columns: in k-quants, round column by column inside each block under ggml's scales (round_columns).
    info: if given, receives 'lambda' and 'order' (the block order used)."""
    t = ggml_type(qtype)
    W = np.asarray(W)
    n_out, n_in = W.shape
    bs = block_size(t)
    if n_in % bs:
        raise UserError(f"{t.name} needs rows that are a multiple of {bs} elements, not {n_in}")
    n_blocks = n_in // bs
    block_bytes = row_bytes(t, bs)
    if block_bytes * n_blocks != row_bytes(t, n_in):
        raise ValueError(f"{t.name}: a row is not a sequence of whole blocks")
    if factor is None:
        if R is None or R.shape != (n_in, n_in):
            raise ValueError(f"covariance is {None if R is None else R.shape}, the matrix has {n_in} input columns")
        factor = gptq_factor(R, bs, damp, by_importance)
    elif factor.block != bs or factor.U.shape[0] != n_in:
        raise ValueError(f"the factor is for blocks of {factor.block} over {factor.U.shape[0]} columns, "
                         f"{t.name} of this matrix needs {bs} over {n_in}")
    order, perm, U, importance = factor.order, factor.perm, factor.U, factor.importance
    if info is not None:
        info.update({"lambda": factor.lam, "order": order.tolist()})

    out = np.empty((n_out, n_blocks * block_bytes), dtype=np.uint8)
    by_column = columns and kquant_codes.layout(t) is not None

    def quantize(i: int, values: np.ndarray) -> np.ndarray:
        b, cols = order[i], slice(i * bs, (i + 1) * bs)
        q = quantize_rows(t, values.astype(np.float32), importance[cols] if use_importance else None, threads)
        if by_column:
            q = round_columns(t, q, values, U[cols, cols])
        out[:, b * block_bytes:(b + 1) * block_bytes] = q
        return dequantize_rows(t, q, bs)

    propagate(np.asarray(W, dtype=np.float64)[:, perm].copy(), U, bs, quantize, factor.transfers)
    return out


def output_error(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """tr((W-Q) H (W-Q)^T): the summed squared output error of the layer under inputs with E[x x^T] = H."""
    E = np.asarray(W, dtype=np.float64) - np.asarray(Q, dtype=np.float64)
    return float(np.einsum("ij,ij->", E @ np.asarray(H, dtype=np.float64), E))
