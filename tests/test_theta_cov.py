"""Exact (covariance-whitened) theta, the source table and the budgeted rank allocation, against
independent numpy computations on synthetic data."""

import numpy as np
import pytest

from nkat_gguf.theta import lowrank as theta
from nkat_gguf.errors import UserError

rng = np.random.default_rng(7)


def correlated_inputs(n: int, tokens: int) -> np.ndarray:
    """Inputs (tokens, n) with strongly correlated columns and uneven scales, like real activations."""
    mix = rng.standard_normal((n, n)) * (0.85 ** np.arange(n))[None, :]
    return rng.standard_normal((tokens, n)) @ mix.T + 0.05 * rng.standard_normal((tokens, n))


def output_error(E, P, Q, X):
    """Mean over tokens of ||(E - P Q^T) x||^2, computed on the tokens themselves."""
    D = (E - P.astype(np.float64) @ Q.astype(np.float64).T) @ X.T
    return float((D ** 2).sum() / X.shape[0])


def test_exact_solution_reaches_the_analytic_optimum_and_beats_the_diagonal():
    m, n, r = 48, 40, 6
    X = correlated_inputs(n, 4000)
    R = X.T @ X / X.shape[0]
    E = rng.standard_normal((m, n))
    L = theta.covariance_root(R, floor=1e-12)
    P, Q, S = theta.whitened_low_rank(E, L, r)
    # The optimum of E||(E - theta) x||^2 over rank r: the discarded squared singular values of
    # E R^1/2, with R^1/2 from an independent eigendecomposition.
    lam, V = np.linalg.eigh(R)
    sv = np.linalg.svd(E @ (V * np.sqrt(np.maximum(lam, 0))) @ V.T, compute_uv=False)
    np.testing.assert_allclose(S, sv[:r], rtol=1e-4)
    optimum = float((sv[r:] ** 2).sum())
    assert output_error(E, P, Q, X) == pytest.approx(optimum, rel=1e-4)
    # the diagonal (imatrix) version is worse on correlated inputs
    Pd, Qd = theta.low_rank(E, r, col_scale=np.sqrt(np.diag(R)).astype(np.float32))
    assert output_error(E, Pd, Qd, X) > 1.2 * optimum


def test_full_rank_with_exact_statistics_reproduces_the_outputs():
    m, n = 30, 24
    X = correlated_inputs(n, 500)
    E = rng.standard_normal((m, n))
    P, Q, _ = theta.whitened_low_rank(E, theta.covariance_root(X.T @ X / 500), n)
    np.testing.assert_allclose((P.astype(np.float64) @ Q.T) @ X.T, E @ X.T, rtol=1e-3, atol=1e-3)


def test_floor_handles_rank_deficient_covariance():
    n = 32
    X = rng.standard_normal((10, n))  # 10 tokens: R has rank 10
    L = theta.covariance_root(X.T @ X / 10)
    assert np.isfinite(L).all() and np.all(np.diag(L) > 0)
    with pytest.raises(theta.StatisticsError):
        theta.covariance_root(np.zeros((n, n)))
    with pytest.raises(theta.StatisticsError):
        theta.whitened_low_rank(np.ones((4, 5)), L, 2)


def test_source_table_is_the_one_list():
    assert theta.SOURCES == tuple(theta.SOURCE_TABLE)
    cov = theta.source_info("residual-cov")
    assert cov.needs_reference and cov.statistics == "covariance"
    assert theta.source_info("residual-act").statistics == "diagonal"
    for s in theta.SOURCE_TABLE.values():
        low, high = s.gamma_range
        assert low <= s.default_gamma <= high
    with pytest.raises(UserError, match="residual-cov"):  # names the known ones
        theta.source_info("residual-exact")


def test_allocation_spends_within_budget_and_is_monotone():
    gains = {f"m{i}": np.sort(rng.exponential(1.0, 16) * (i + 1))[::-1] for i in range(6)}
    costs = {f"m{i}": 10.0 + 5 * i for i in range(6)}
    first = {name: 7.0 for name in gains}
    previous = dict.fromkeys(gains, 0)
    for budget in range(0, 1500, 37):
        ranks = theta.allocate_ranks(gains, costs, budget, first)
        spent = sum(ranks[n] * costs[n] + (first[n] if ranks[n] else 0) for n in gains)
        assert spent <= budget
        assert all(ranks[n] >= previous[n] for n in gains)  # no matrix loses rank as the budget grows
        previous = ranks
    capped = theta.allocate_ranks(gains, costs, 1e9, first, max_matrices=2)
    assert sum(1 for r in capped.values() if r) == 2


def test_allocation_prefers_gain_per_byte():
    gains = {"a": np.array([100.0, 50.0, 1.0]), "b": np.array([60.0, 40.0, 30.0])}
    costs = {"a": 10.0, "b": 20.0}
    # per byte: a 10, 5, 0.1; b 3, 2, 1.5 -> a, a, b (40 bytes); b's second does not fit in 50: stop
    assert theta.allocate_ranks(gains, costs, budget_bytes=50) == {"a": 2, "b": 1}
    assert theta.allocate_ranks(gains, costs, budget_bytes=85) == {"a": 2, "b": 3}
