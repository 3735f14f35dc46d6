"""The theta math: numpy in, numpy out. No files, no llama.cpp.

theta approximates a correction E (out x in) with rank r:
  source "weight":       E = W                     (the seed's method)
  source "residual":     E = W_ref - W_q
  source "residual-act": E = W_ref - W_q, with the SVD taken of E diag(s), s_i = sqrt(E[x_i^2]),
                         and unscaled afterwards (QERA-approx / L2QER), so the error that matters
                         for real inputs is what is minimized.
structures:
  "general":       theta = M, the rank-r approximation (any shape);
  "antisymmetric": theta = 0.5 (M - M^T) for square W (the NKAT form), factored exactly as
                   B = 0.5 [P, -Q], A = [Q, P]^T with M = P Q^T (stored rank 2r).
"""

from __future__ import annotations

import numpy as np

from .errors import UserError

SOURCES = ("weight", "residual", "residual-act")
# What the seed's source was measured to do (README results, nkat ppl --chunks 8 on the demo pair).
WEIGHT_SOURCE_EFFECT = ("theta from the weight itself (the seed's method) was measured to break the model: "
                        "PPL 29.6 -> 10390 on SmolLM2-135M Q4_0 at rank 8, gamma 0.97")
NO_REFERENCE = ("no --reference: theta corrects what quantization lost, measured against a reference (a "
                "higher-precision GGUF of the same model); pass --reference REF.gguf (or make a lower-bit base "
                "from the model you have: nkat quantize --input M.gguf --output base.gguf), or ask for the "
                "seed's method by name with --source weight")
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
    k = min(rank + max(_OVERSAMPLE, rank), m, n)
    if k >= min(m, n) * 0.5:
        U, S, Vt = np.linalg.svd(E, full_matrices=False)
        return U[:, :rank], S[:rank], Vt[:rank]
    rng = np.random.default_rng(_SEED)
    transpose = m < n  # sketch the longer side
    X = E.T if transpose else E
    Q = np.linalg.qr(X @ rng.standard_normal((X.shape[1], k), dtype=np.float32))[0]
    for _ in range(_POWER_ITERATIONS):
        Q = np.linalg.qr(X.T @ Q)[0]
        Q = np.linalg.qr(X @ Q)[0]
    Ub, S, Vt = np.linalg.svd(Q.T @ X, full_matrices=False)
    U = Q @ Ub
    if transpose:
        U, Vt = Vt.T, U.T
    return U[:, :rank], S[:rank], Vt[:rank]


def check_rank(rank: int, shape: tuple[int, int], name: str = "") -> None:
    if rank <= 0 or rank > min(shape):
        where = f" for {name} {shape[0]}x{shape[1]}" if name else ""
        raise UserError(f"--theta-rank must be between 1 and {min(shape)}{where}, not {rank}")


def resolve_structure(structure: str, shape: tuple[int, int]) -> str:
    """auto -> antisymmetric for square matrices, general otherwise."""
    if structure not in STRUCTURES:
        raise UserError(f"--structure must be one of {', '.join(STRUCTURES)}, not {structure!r}")
    if structure == "auto":
        return "antisymmetric" if shape[0] == shape[1] else "general"
    if structure == "antisymmetric" and shape[0] != shape[1]:
        raise UserError(
            f"antisymmetric theta needs a square matrix, not {shape[0]}x{shape[1]}: use --structure auto"
        )
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
        U, S, Vt = truncated_svd(E * col_scale[None, :], rank)
        return (U * S).astype(np.float32), (Vt.T / col_scale[:, None]).astype(np.float32)
    U, S, Vt = truncated_svd(E, rank)
    return (U * S).astype(np.float32), Vt.T.astype(np.float32)


def factors(E: np.ndarray, rank: int, structure: str, col_scale: np.ndarray | None = None):
    """(B, A) with theta = B @ A for a resolved structure ('general' or 'antisymmetric')."""
    P, Q = low_rank(E, rank, col_scale)
    return structure_factors(P, Q, structure)


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
    if source == "weight":
        return W
    if W_ref is None:
        raise UserError(f"--source {source} needs --reference (a higher-precision GGUF of the same model)")
    return W_ref - W
