"""The theta math against independent numpy computations."""

import numpy as np
import pytest

from nkat_gguf.theta import lowrank as theta
from nkat_gguf.errors import UserError
from helpers import factors

rng = np.random.default_rng(42)


def low_rank_plus_noise(m, n, r, noise=1e-3):
    return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) + noise * rng.standard_normal((m, n))).astype(np.float32)


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (300, 301)])
def test_truncated_svd_matches_lapack(shape):
    # A decaying spectrum like a real quantization residual's, plus a noise floor.
    m, n = shape
    U = np.linalg.qr(rng.standard_normal((m, 64)))[0]
    V = np.linalg.qr(rng.standard_normal((n, 64)))[0]
    E = ((U * 0.93 ** np.arange(64)) @ V.T + 1e-3 * rng.standard_normal((m, n))).astype(np.float32)
    U, S, Vt = theta.truncated_svd(E, 16)
    S_ref = np.linalg.svd(E.astype(np.float64), compute_uv=False)[:16]
    np.testing.assert_allclose(S, S_ref, rtol=2e-3)
    # The approximation error is within 1 % of the optimal (Eckart-Young) error.
    err = np.linalg.norm(E - (U * S) @ Vt)
    best = np.sqrt((np.linalg.svd(E.astype(np.float64), compute_uv=False)[16:] ** 2).sum())
    assert err <= best * 1.01


def test_general_factors_reproduce_low_rank_matrix():
    E = low_rank_plus_noise(200, 120, r=8, noise=0.0)
    B, A = factors(E, 8, "general")
    assert B.shape == (200, 8) and A.shape == (8, 120)
    np.testing.assert_allclose(B @ A, E, atol=1e-3)


def test_antisymmetric_form_is_antisymmetric_and_exact():
    E = low_rank_plus_noise(128, 128, r=4, noise=0.0)
    B, A = factors(E, 4, "antisymmetric")
    assert B.shape == (128, 8) and A.shape == (8, 128)
    T = B @ A
    np.testing.assert_allclose(T + T.T, 0, atol=1e-4)
    np.testing.assert_allclose(T, 0.5 * (E - E.T), atol=1e-3)


def test_activation_scaling_lowers_the_weighted_error():
    E = rng.standard_normal((256, 192)).astype(np.float32)
    s = np.exp(rng.standard_normal(192)).astype(np.float32)  # very uneven input RMS
    P0, Q0 = theta.low_rank(E, 16)
    P1, Q1 = theta.low_rank(E, 16, col_scale=s)
    weighted = lambda P, Q: np.linalg.norm((E - P @ Q.T) * s[None, :])
    assert weighted(P1, Q1) < 0.97 * weighted(P0, Q0)


def test_structure_rules():
    assert theta.resolve_structure("auto", (64, 64)) == "antisymmetric"
    assert theta.resolve_structure("auto", (64, 32)) == "general"
    with pytest.raises(UserError, match="square"):
        theta.resolve_structure("antisymmetric", (64, 32))
    with pytest.raises(UserError, match="between 1 and 32"):
        theta.check_rank(33, (64, 32))
    with pytest.raises(UserError):
        theta.check_rank(0, (64, 32))
