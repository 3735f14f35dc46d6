"""The INT8 star-product kernel against numpy, on every ISA this CPU has."""

from __future__ import annotations

import numpy as np
import pytest

from nkat_gguf.runtime import native
from nkat_gguf.errors import UserError
from helpers import star_apply

# (n_out, n_in, rank, n_cols): odd sizes, rank 1 and 64, n_in not a multiple of 32 (nor of the
# 64-output tile), batches big enough to be split across threads by columns, a 4097-wide matrix.
SHAPES = [
    (1, 1, 1, 1),
    (7, 33, 1, 3),
    (576, 576, 8, 1),
    (193, 1537, 64, 37),
    (1536, 576, 32, 5),
    (65, 100, 3, 16),
    (2049, 4097, 64, 1),
    (576, 1536, 8, 130),
]
TOL = 2e-6  # float32 accumulation vs float64 with the same INT8 factors


def random_case(rng, n_out, n_in, rank, n_cols):
    f = native.quantize_factors(rng.standard_normal((rank, n_in)), rng.standard_normal((n_out, rank)), "t")
    x = rng.standard_normal((n_cols, n_in)).astype(np.float32)
    return f, x


@pytest.mark.parametrize("isa", native.supported_isas())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_numpy(isa, shape):
    rng = np.random.default_rng(sum(shape))
    f, x = random_case(rng, *shape)
    with native.use_isa(isa):
        assert native.isa() == isa
        y = native.star_apply_factors(f, x, np.zeros((shape[3], shape[0]), np.float32), 0.37, threads=2)
    assert native.relative_error(y, native.reference(f, x, 0.37)) < TOL


def test_kernel_accumulates_into_y():
    rng = np.random.default_rng(1)
    f, x = random_case(rng, 300, 257, 5, 4)
    y0 = rng.standard_normal((4, 300)).astype(np.float32)
    y = native.star_apply_factors(f, x, y0.copy(), -1.5)
    want = y0.astype(np.float64) + native.reference(f, x, -1.5)
    assert np.max(np.abs(y - want)) < 1e-5 * np.max(np.abs(want))


def test_scale_zero_leaves_y_bit_identical():
    rng = np.random.default_rng(2)
    f, x = random_case(rng, 64, 64, 4, 3)
    y0 = rng.standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(native.star_apply_factors(f, x, y0.copy(), 0.0), y0)


@pytest.mark.parametrize("shape", [(576, 1536, 8, 130), (2049, 4097, 64, 1), (1536, 576, 32, 3)])
def test_threads_give_identical_results(shape):
    rng = np.random.default_rng(3)
    f, x = random_case(rng, *shape)
    one = native.star_apply_factors(f, x, np.zeros((shape[3], shape[0]), np.float32), 1.0, threads=1)
    two = native.star_apply_factors(f, x, np.zeros((shape[3], shape[0]), np.float32), 1.0, threads=2)
    assert np.array_equal(one, two)


def test_star_apply_with_untransposed_b():
    rng = np.random.default_rng(4)
    f, x = random_case(rng, 100, 70, 6, 2)
    B_q = np.ascontiguousarray(f.Bt_q.T)  # (n_out, rank), the natural layout
    y = star_apply(f.A_q, f.A_scale, B_q, f.B_scale, x, np.zeros((2, 100), np.float32), 0.5)
    assert native.relative_error(y, native.reference(f, x, 0.5)) < TOL
    yt = star_apply(f.A_q, f.A_scale, f.Bt_q, f.B_scale, x, np.zeros((2, 100), np.float32), 0.5,
                           b_transposed=True)
    assert np.array_equal(y, yt)


def test_per_row_int8_error_bound():
    """Every element is within half a quantization step: |m - q*s| <= max|row| / 254."""
    rng = np.random.default_rng(5)
    m = rng.standard_normal((40, 333)).astype(np.float32) * rng.uniform(0.01, 10, (40, 1)).astype(np.float32)
    m[3] = 0.0  # an all-zero row stays zero
    q, s = native.quantize_rows(m)
    assert q.dtype == np.int8 and s.dtype == np.float32 and np.abs(q).max() <= 127
    err = np.abs(m - q.astype(np.float32) * s[:, None])
    assert (err <= np.abs(m).max(axis=1, keepdims=True) / 254 * (1 + 1e-5) + 1e-30).all()
    assert not q[3].any() and s[3] == 0


def test_factors_round_trip_shapes():
    rng = np.random.default_rng(6)
    A, B = rng.standard_normal((8, 50)), rng.standard_normal((30, 8))
    f = native.quantize_factors(A, B, "blk.0.attn_q.weight")
    assert (f.rank, f.n_in, f.n_out) == (8, 50, 30)
    assert f.A().shape == (8, 50) and f.B().shape == (30, 8)
    theta = B @ A
    assert np.linalg.norm(f.B() @ f.A() - theta) < 0.02 * np.linalg.norm(theta)


@pytest.mark.parametrize("bad", ["dtype", "shape", "columns", "readonly"])
def test_bad_arrays_are_refused(bad):
    rng = np.random.default_rng(7)
    f, x = random_case(rng, 10, 20, 2, 3)
    y = np.zeros((3, 10), np.float32)
    if bad == "dtype":
        x = x.astype(np.float64)
    elif bad == "shape":
        x = x[:, :19].copy()
    elif bad == "columns":
        y = np.zeros((2, 10), np.float32)
    else:
        y.flags.writeable = False
    with pytest.raises(ValueError):
        native.star_apply_factors(f, x, y, 1.0)


def test_bad_factors_are_refused():
    with pytest.raises(UserError):
        native.quantize_factors(np.ones((4, 10)), np.ones((5, 3)))
    with pytest.raises(UserError):
        native.quantize_factors(np.full((2, 3), np.nan), np.ones((5, 2)))


def test_self_test_reports_ok():
    result = native.self_test()
    assert result["ok"], result
    assert result["isa"] in native.ISAS and result["abi"] == "ok"
    assert result["max_rel_err"] < result["tolerance"]


def test_unsupported_isa_is_refused():
    with pytest.raises(ValueError):
        with native.use_isa("neon"):
            pass


def test_shim_hook_is_given_the_applied_scale_not_gamma():
    """The 0.5 * gamma rule lives in nkat_format.applied_scale; the C hook multiplies by what
    it is given, so what it holds must be that product (gamma itself would double theta)."""
    from nkat_gguf.formats.nkat_format import ThetaFactors, applied_scale

    A, B = np.ones((2, 32), np.float32), np.ones((32, 2), np.float32)
    hook = native.ShimHook({"blk.0.attn_q.weight": ThetaFactors("blk.0.attn_q.weight", A, B)}, gamma=3.0)
    try:
        held = native.lib.nkat_hook_get_scale(hook._handle())
        assert held == pytest.approx(applied_scale(3.0)) and applied_scale(3.0) == pytest.approx(1.5)
        assert hook.gamma == 3.0
        hook.set_gamma(0.0)
        assert native.lib.nkat_hook_get_scale(hook._handle()) == 0.0
    finally:
        hook.close()
