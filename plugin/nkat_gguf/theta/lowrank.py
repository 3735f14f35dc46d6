"""The theta math: numpy in, numpy out. No files, no llama.cpp.

theta approximates a correction E (out x in) with rank r:
  source "weight":       E = W                     (the seed's method)
  source "residual":     E = W_ref - W_q
  source "residual-act": E = W_ref - W_q, with the SVD taken of E diag(s), s_i = sqrt(E[x_i^2]),
                         and unscaled afterwards (QERA-approx / L2QER), so the error that matters
                         for real inputs is what is minimized.
  source "residual-cov": E = W_ref - W_q, with the SVD taken of E L where L L^T = R + delta I,
                         R = E[x x^T] the input autocorrelation (QERA-exact / EoRA): theta then
                         minimizes E||(E - theta) x||^2 exactly, and each discarded squared
                         singular value is the output error it leaves (see whitened_low_rank).
The sources are one table (SOURCE_TABLE) that convert, optimize and the CLI all read.
structures:
  "general":       theta = M, the rank-r approximation (any shape);
  "antisymmetric": theta = 0.5 (M - M^T) for square W (the NKAT form), factored exactly as
                   B = 0.5 [P, -Q], A = [Q, P]^T with M = P Q^T (stored rank 2r).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..errors import BadSetting, Setting, UserError


class UnknownSource(UserError):
    """A source name that is not in SOURCE_TABLE."""


class StatisticsError(UserError):
    """Activation statistics that cannot be used (empty, not finite, wrong size)."""


class StatisticsKind(str, Enum):
    """What a source weights the residual with, beside nothing (str-valued: JSON spells the value;
    a StrEnum of util.enums, written out because the math imports nothing of ours but errors)."""

    __str__ = str.__str__
    __format__ = str.__format__

    DIAGONAL = "diagonal"  # imatrix: sum of x_i^2 per input column
    COVARIANCE = "covariance"  # sum of x x^T per distinct input


@dataclass(frozen=True)
class Source:
    """What one theta source needs and how strongly it is applied by default."""

    name: str
    needs_reference: bool
    statistics: StatisticsKind | None
    default_gamma: float
    gamma_range: tuple[float, float]  # what nkat optimize searches
    summary: str


# gamma 2 applies theta = E itself (0.5 * gamma * theta), so residual sources search around it; the
# weight source adds a scaled copy of W's own low-rank part, sensible only near 0.
SOURCE_TABLE = {s.name: s for s in (
    Source("weight", False, None, 0.05, (-0.2, 0.2), "SVD of W itself (the seed's method)"),
    Source("residual", True, None, 2.0, (0.0, 2.5), "SVD of W_ref - W"),
    Source("residual-act", True, StatisticsKind.DIAGONAL, 2.0, (0.0, 2.5),
           "SVD of W_ref - W weighted by the input RMS (imatrix)"),
    Source("residual-cov", True, StatisticsKind.COVARIANCE, 2.0, (0.0, 2.5),
           "SVD of W_ref - W whitened by the input covariance (exact output error)"),
)}
SOURCES = tuple(SOURCE_TABLE)


def source_info(name: str) -> Source:
    """The table row of a source; an unknown name fails with the list of known ones."""
    try:
        return SOURCE_TABLE[name]
    except KeyError:
        raise UnknownSource(f"unknown theta source {name!r} (known: {', '.join(SOURCES)})") from None

# What the seed's source was measured to do (README results, nkat ppl --chunks 8 on the demo pair).
WEIGHT_SOURCE_EFFECT = ("theta from the weight itself (the seed's method) was measured to break the model: "
                        "PPL 29.6 -> 10390 on SmolLM2-135M Q4_0 at rank 8, gamma 0.97")
STRUCTURES = ("auto", "antisymmetric", "general")
_OVERSAMPLE = 10
_POWER_ITERATIONS = 3
_SEED = 0


def truncated_svd(E: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-`rank` singular triplets (U (m,r), S (r,), Vt (r,n)).

    Randomized range finder with power iterations (Halko et al.) when rank is small against the
    matrix; LAPACK's SVD only when the sketch would be nearly as big as the matrix anyway.
    """
    m, n = E.shape
    if _sketch_width(rank, m, n) is None:
        U, S, Vt = np.linalg.svd(E, full_matrices=False)
        return U[:, :rank], S[:rank], Vt[:rank]
    return _operator_svd(lambda M: E @ M, lambda N: E.T @ N, m, n, rank)


def _sketch_width(rank: int, m: int, n: int) -> int | None:
    """Columns of the random sketch, or None where a dense SVD is about as cheap."""
    k = min(rank + max(_OVERSAMPLE, rank), m, n)
    return None if k >= min(m, n) * 0.5 else k


def _operator_svd(mul, rmul, m: int, n: int, rank: int):
    """Randomized truncated SVD of an m x n operator X known only through mul(M) = X M and
    rmul(N) = X^T N, sketching the longer side. X itself is never formed."""
    if m < n:
        U, S, Vt = _operator_svd(rmul, mul, n, m, rank)
        return Vt.T, S, U.T
    k = _sketch_width(rank, m, n)
    rng = np.random.default_rng(_SEED)
    Q = np.linalg.qr(mul(rng.standard_normal((n, k), dtype=np.float32)))[0]
    for _ in range(_POWER_ITERATIONS):
        Q = np.linalg.qr(rmul(Q))[0]
        Q = np.linalg.qr(mul(Q))[0]
    Ub, S, Vt = np.linalg.svd(rmul(Q).T, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vt[:rank]


def check_rank(rank: int, shape: tuple[int, int], name: str = "") -> None:
    if rank <= 0 or rank > min(shape):
        where = f" for {name} {shape[0]}x{shape[1]}" if name else ""
        raise BadSetting(Setting.THETA_RANK, f"must be between 1 and {min(shape)}{where}, not {rank}")


def resolve_structure(structure: str, shape: tuple[int, int]) -> str:
    """auto -> antisymmetric for square matrices, general otherwise."""
    if structure not in STRUCTURES:
        raise BadSetting(Setting.STRUCTURE, f"must be one of {', '.join(STRUCTURES)}, not {structure!r}")
    if structure == "auto":
        return "antisymmetric" if shape[0] == shape[1] else "general"
    if structure == "antisymmetric" and shape[0] != shape[1]:
        raise BadSetting(f"antisymmetric theta needs a square matrix, not {shape[0]}x{shape[1]}: use",
                         Setting.STRUCTURE, "auto")
    return structure


def low_rank(E: np.ndarray, rank: int, col_scale: np.ndarray | None = None):
    """Rank-r factors (P (m,r), Q (n,r)) with E ~ P Q^T, optionally weighted by input scales.

    With col_scale s the SVD is of E diag(s): P = U S, Q = diag(1/s) V, so P Q^T minimizes the
    error on inputs whose per-column RMS is s.
    """
    E = np.asarray(E, dtype=np.float32)
    if col_scale is not None:
        if col_scale.shape != (E.shape[1],):
            raise UserError(f"activation scales have {col_scale.shape[0]} columns, the matrix {E.shape[1]}")
        U, S, Vt = _checked_svd(E * col_scale[None, :], rank)
        return (U * S).astype(np.float32), (Vt.T / col_scale[:, None]).astype(np.float32)
    U, S, Vt = _checked_svd(E, rank)
    return (U * S).astype(np.float32), Vt.T.astype(np.float32)


def _checked_svd(X: np.ndarray, rank: int):
    """truncated_svd, with a domain error instead of an overflow or a LAPACK failure (values
    near float32's limit only come from a damaged file)."""
    try:
        with np.errstate(over="raise", invalid="raise"):
            return truncated_svd(X, rank)
    except (FloatingPointError, np.linalg.LinAlgError):
        raise UserError(f"values up to {float(np.abs(X).max()):.3g} are too large for a float32 SVD "
                        "(a damaged weight?)") from None


def structure_factors(P: np.ndarray, Q: np.ndarray, structure: str):
    """(B, A) from M = P Q^T: general -> (P, Q^T); antisymmetric -> 0.5 (M - M^T), rank 2r."""
    if structure == "general":
        return P, np.ascontiguousarray(Q.T)
    if structure == "antisymmetric":
        B = 0.5 * np.concatenate([P, -Q], axis=1)
        A = np.concatenate([Q, P], axis=1).T
        return B.astype(np.float32), np.ascontiguousarray(A, dtype=np.float32)
    raise UserError(f"unknown structure {structure!r}")


def correction_matrix(source: str, W: np.ndarray, W_ref: np.ndarray | None) -> np.ndarray:
    """The matrix theta approximates for a source."""
    if not source_info(source).needs_reference:
        return W
    if W_ref is None:
        raise BadSetting(Setting.SOURCE, f"{source} needs", Setting.REFERENCE,
                         "(a higher-precision GGUF of the same model)")
    return W_ref - W


# ---------------------------------------------------------------- exact (covariance) whitening --
# R's square root is the Cholesky factor L of R + delta I, delta = COV_FLOOR * trace(R) / n: every
# eigenvalue of R is raised by delta (a floor for the tiny and round-off-negative ones, so that
# L^-1 in lora_a stays bounded). Any L with L L^T = R gives the same optimum as the symmetric
# R^1/2 (||X L||_F = ||X R^1/2||_F), and Cholesky costs ~1/10 of an eigendecomposition: at n = 4096
# here numpy took 57 s for eigh and 3.2 s for cholesky, and the 1.5B model has 28 inputs of 8960.
COV_FLOOR = 1e-4
_FLOOR_RETRIES = 4  # x10 each time Cholesky still meets a non-positive pivot (float32 round-off)


def covariance_root(R: np.ndarray, floor: float = COV_FLOOR) -> np.ndarray:
    """Lower-triangular L (float64) with L L^T = R + delta I (see COV_FLOOR); R's lower triangle is read."""
    R = np.array(R, dtype=np.float64)  # a copy: the floor is added in place
    n = R.shape[0]
    if R.ndim != 2 or R.shape != (n, n) or not np.isfinite(R).all():
        raise StatisticsError(f"covariance of shape {R.shape} is not a finite square matrix")
    mean_eig = float(np.trace(R)) / n
    if mean_eig <= 0:
        raise StatisticsError("covariance has no positive variance (did the input ever fire?)")
    diagonal, added = np.diag_indices(n), 0.0
    for attempt in range(_FLOOR_RETRIES + 1):
        delta = floor * mean_eig * 10.0 ** attempt
        R[diagonal] += delta - added
        added = delta
        try:
            return np.linalg.cholesky(R)
        except np.linalg.LinAlgError:
            continue
    raise StatisticsError(f"covariance is not positive semi-definite even with a floor of {delta:.3g}")


def whitened_low_rank(E: np.ndarray, L: np.ndarray, rank: int):
    """(P (m,r), Q (n,r), S (r,)) minimizing ||(E - P Q^T) L||_F, i.e. E||(E - theta) x||^2 for
    inputs with autocorrelation L L^T.

    SVD of the whitened E L = U S V^T, P = U S, Q = L^-T V: theta = U S V^T L^-1, and the
    error left is exactly the sum of the discarded S^2 (Eckart-Young in the whitened space).
    """
    from scipy.linalg import solve_triangular

    E = np.asarray(E, dtype=np.float64)
    if L.shape != (E.shape[1], E.shape[1]):
        raise StatisticsError(f"covariance is {L.shape[0]} wide, the matrix has {E.shape[1]} columns")
    U, S, Vt = _whitened_svd(E, L, rank)
    Q = solve_triangular(L, Vt.T, lower=True, trans="T")
    return (U * S).astype(np.float32), Q.astype(np.float32), S.astype(np.float64)


def _whitened_svd(E: np.ndarray, L: np.ndarray, rank: int):
    """truncated_svd(E @ L) without forming E @ L where a sketch suffices: for the 1536 x 8960
    down-projection that product alone is 2.5e11 flops; the sketch's 8 products at rank 32 (each a
    trmm with the triangular L and a product with E) are 5.5e10 together."""
    from scipy.linalg.blas import dtrmm

    m, n = E.shape
    if _sketch_width(rank, m, n) is None:
        return truncated_svd(E @ L, rank)
    Lt = L.T  # Fortran-ordered upper triangle: BLAS takes it without a copy

    def mul(M):  # (E L) M
        return E @ dtrmm(1.0, Lt, np.asfortranarray(M, dtype=np.float64), lower=0, trans_a=1)

    def rmul(N):  # (E L)^T N = L^T (E^T N)
        return dtrmm(1.0, Lt, np.asfortranarray(E.T @ N), lower=0, trans_a=0)

    return _operator_svd(mul, rmul, m, n, rank)


# ---------------------------------------------------------------- rank allocation under a budget --
def allocate_ranks(gains: dict[str, np.ndarray], costs: dict[str, float], budget_bytes: float,
                   first_cost: dict[str, float] | None = None, max_matrices: int | None = None) -> dict[str, int]:
    """Every matrix's rank from one global greedy cut by gain per byte.

    gains[name]: what each further rank-1 component buys, non-increasing (whitened sigma^2 is
    the output error it removes); costs[name]: its stored bytes; first_cost[name]: bytes a
    matrix's first component costs on top (its tensors' headers). Components are taken in order
    of gain/cost until the first that does not fit, so every matrix's rank grows with the budget
    (a larger budget extends the same prefix). max_matrices caps how many matrices get theta.
    """
    first_cost = first_cost or {}
    order = sorted(((float(g) / costs[name], i, name) for name, gs in gains.items() for i, g in enumerate(gs)),
                   key=lambda t: (-t[0], t[1], t[2]))
    ranks = dict.fromkeys(gains, 0)
    spent, active = 0.0, 0
    for _, _, name in order:
        new = ranks[name] == 0
        if new and max_matrices is not None and active >= max_matrices:
            continue
        extra = costs[name] + (first_cost.get(name, 0.0) if new else 0.0)
        if spent + extra > budget_bytes:
            break
        ranks[name] += 1
        spent += extra
        active += new
    return ranks
