"""GPTQ block propagation into llama.cpp's types (runtime/gptq, runtime/gptq_file) against
independent computations: the conditional least-squares optimum computed from H directly, ggml's
own quantization of the same tensor, ggml's imatrix rounding, llama.cpp's quantizer and loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.cli import main
from nkat_gguf.formats.gguf_io import open_gguf
from nkat_gguf.runtime import ggml_quants as gq
from nkat_gguf.runtime import kquant_codes
from nkat_gguf.runtime.gptq import (gptq_quantize_matrix, output_error, propagate, round_columns,
                                    upper_cholesky_of_inverse)

TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
         "IQ3_S", "IQ4_XS", "IQ4_NL", "IQ1_S", "IQ1_M"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def correlated(n_in: int, n_out: int, seed: int = 0):
    """A weight matrix, and the autocorrelation of inputs with strong shared directions and
    unequal column scales (like a transformer's normed activations)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((4 * n_in, 16)) @ rng.standard_normal((16, n_in)) + 0.3 * rng.standard_normal((4 * n_in, n_in))
    X *= np.exp(rng.normal(0, 0.7, n_in))
    W = (0.05 * rng.standard_normal((n_out, n_in))).astype(np.float32)
    return W, X.T @ X / X.shape[0]


def test_upper_factor_is_the_cholesky_factor_of_the_inverse():
    _, R = correlated(64, 1)
    H = R + 0.01 * np.eye(64)
    U = upper_cholesky_of_inverse(H)
    assert np.allclose(U, np.triu(U))
    assert np.allclose(U.T @ U, np.linalg.inv(H), rtol=1e-8, atol=1e-8 * np.abs(np.linalg.inv(H)).max())


def test_block_rule_equals_the_conditional_optimum():
    """After each block is fixed, the columns left equal argmin over them of the loss with the
    fixed ones held, computed from H directly: X_R = W0_R + (W0_F - Q_F) H_FR H_RR^-1."""
    W0, R = correlated(96, 7, seed=1)
    W0 = W0.astype(np.float64)
    H = R + 0.05 * np.mean(np.diag(R)) * np.eye(96)
    bs, seen = 16, []

    def rounding(i, values):
        seen.append(values.copy())
        return np.round(values * 20) / 20

    propagate(W0.copy(), upper_cholesky_of_inverse(H), bs, rounding)
    Q = np.concatenate([np.round(v * 20) / 20 for v in seen], axis=1)
    for i, values in enumerate(seen):
        F, Rr = slice(0, i * bs), slice(i * bs, None)
        expected = W0[:, Rr] + (W0[:, F] - Q[:, F]) @ H[F, Rr] @ np.linalg.inv(H[Rr, Rr])
        assert np.allclose(values, expected[:, :bs], atol=1e-9), f"block {i}"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", *KQUANTS, "IQ3_XXS", "IQ4_XS"])
def test_uncorrelated_inputs_give_ggml_own_bytes(qtype):
    """H = I: nothing propagates, so every block is ggml's quantization of the same tensor (in
    k-quants, ggml's codes are the nearest under its final scales, as the columns' are)."""
    W, _ = correlated(512, 40, seed=2)
    I = np.eye(512)
    ones = np.ones(512, dtype=np.float32)
    got = gptq_quantize_matrix(W, I, qtype, damp=0.0)
    if qtype == "Q4_0":  # its weighted path uses a whole-row statistic: compare block by block
        want = np.concatenate([gq.quantize_rows(qtype, W[:, c:c + 32], ones[:32]) for c in range(0, 512, 32)], axis=1)
        assert np.array_equal(gptq_quantize_matrix(W, I, qtype, damp=0.0, use_importance=False),
                              gq.quantize_rows(qtype, W))
    else:
        want = gq.quantize_rows(qtype, W, ones)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("qtype", TYPES)
def test_correlated_inputs_beat_ggml_imatrix_rounding(qtype):
    """Output error tr((W-Q) H (W-Q)^T) below ggml's imatrix rounding (importance = diag H) at the
    same type and bytes, with and without the order of importance."""
    W, R = correlated(512, 24, seed=3)
    baseline = output_error(W, gq.roundtrip(qtype, W, np.diag(R).astype(np.float32)), R)
    for by_importance in (True, False):
        data = gptq_quantize_matrix(W, R, qtype, by_importance=by_importance)
        assert data.shape == (24, gq.row_bytes(qtype, 512))
        assert output_error(W, gq.dequantize_rows(qtype, data, 512), R) < 0.9 * baseline


@pytest.mark.parametrize("qtype", KQUANTS)
def test_code_layout_matches_ggml_dequantization(qtype):
    """kquant_codes against ggml's to_float: ggml's bytes round-trip through their codes, and any
    codes written under ggml's scales dequantize, by ggml, to step * code + offset."""
    W, R = correlated(256, 40, seed=4)
    blocks = gq.quantize_rows(qtype, W, np.diag(R).astype(np.float32))
    codes = kquant_codes.codes_of(qtype, blocks)
    assert np.array_equal(kquant_codes.with_codes(qtype, blocks, codes), blocks)
    step, offset = kquant_codes.affine(qtype, blocks)
    others = np.random.default_rng(5).integers(0, 1 << kquant_codes.layout(qtype).bits, codes.shape)
    for c in (codes, others):
        got = gq.dequantize_rows(qtype, kquant_codes.with_codes(qtype, blocks, c), 256)
        assert np.allclose(step * c + offset, got, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("qtype", KQUANTS)
def test_columns_are_rounded_as_plain_gptq_does(qtype):
    """round_columns' batched updates against GPTQ written out column by column over the whole
    block (Frantar et al., Algorithm 1 without lazy batches), under the same scales."""
    W, R = correlated(256, 30, seed=6)
    U = upper_cholesky_of_inverse(R + 0.1 * np.mean(np.diag(R)) * np.eye(256))
    blocks = gq.quantize_rows(qtype, W, np.diag(R).astype(np.float32))
    step, offset = kquant_codes.affine(qtype, blocks)
    top = (1 << kquant_codes.layout(qtype).bits) - 1
    V, want = W.astype(np.float64), np.zeros((30, 256), dtype=np.int64)
    for c in range(256):
        want[:, c] = np.clip(np.rint((V[:, c] - offset[:, c]) / step[:, c]), 0, top)
        e = (V[:, c] - (step[:, c] * want[:, c] + offset[:, c])) / U[c, c]
        V[:, c + 1:] -= np.outer(e, U[c, c + 1:])
    got = kquant_codes.codes_of(qtype, round_columns(qtype, blocks, W, U))
    assert np.array_equal(got, want)
    assert not np.array_equal(got, kquant_codes.codes_of(qtype, blocks))  # the inputs are correlated


@pytest.mark.parametrize("qtype", KQUANTS)
def test_rounding_column_by_column_beats_whole_blocks(qtype):
    W, R = correlated(512, 24, seed=3)
    error = {columns: output_error(W, gq.dequantize_rows(qtype, gptq_quantize_matrix(W, R, qtype, columns=columns),
                                                         512), R) for columns in (False, True)}
    assert error[True] < error[False]


def test_block_order_puts_the_largest_diagonal_first():
    from nkat_gguf.runtime.gptq import block_order

    diag = np.array([1.0] * 4 + [5.0] * 4 + [3.0] * 4)
    assert block_order(diag, 4).tolist() == [1, 2, 0]
    assert block_order(diag, 4, by_importance=False).tolist() == [0, 1, 2]


def test_transfers_computed_once_give_the_same_propagation():
    """A factor's block transfers, made once and shared by every matrix and type, update the columns
    exactly as solving through U at each block does."""
    from nkat_gguf.runtime.gptq import block_transfers

    W0, R = correlated(96, 5, seed=2)
    U = upper_cholesky_of_inverse(R + 0.05 * np.mean(np.diag(R)) * np.eye(96))
    rounding = lambda i, values: np.round(values * 20) / 20  # noqa: E731
    on_the_fly = propagate(W0.astype(np.float64), U, 16, rounding)
    shared = propagate(W0.astype(np.float64), U, 16, rounding, block_transfers(U, 16))
    assert np.array_equal(on_the_fly, shared)


def test_nearly_singular_covariance_is_damped():
    W, _ = correlated(64, 8)
    v = np.random.default_rng(0).standard_normal((64, 2))
    R = v @ v.T  # rank 2
    info = {}
    data = gptq_quantize_matrix(W, R, "Q8_0", damp=0.0, info=info)
    assert info["lambda"] > 0 and np.isfinite(gq.dequantize_rows("Q8_0", data, 64)).all()


# ------------------------------------------------------------------ the file ------------

@pytest.fixture(scope="module")
def demo_cov(reference_model, calib_text, tmp_path_factory):
    cov = tmp_path_factory.mktemp("gptq") / "demo.cov"
    assert main(["calibrate", "--covariance", "--model", str(reference_model), "--text", str(calib_text),
                 "--chunks", "2", "--ctx", "128", "--threads", "2", "--output", str(cov), "--quiet"]) == 0
    return cov


@pytest.mark.slow
def test_gptq_file_has_llama_cpp_layout_and_scores(demo_cov, reference_model, base_model, short_text, tmp_path):
    """Same type as llama.cpp: every tensor's type, shape and offset equal, the non-covered ones
    byte-equal, the covered ones different; stock llama-cpp-python loads and scores it close to
    llama.cpp's own file."""
    from nkat_gguf.formats.covariance import CovarianceFile
    from nkat_gguf.runtime.gptq_file import gptq_quantize_model

    # llama.cpp's own Q4_0 of the reference: the session's base (quantize_model(reference, "q4_0"))
    plain, gptq = Path(base_model), tmp_path / "gptq.gguf"
    result = gptq_quantize_model(str(reference_model), str(gptq), "q4_0", str(demo_cov), quiet=True)
    a, b = open_gguf(plain), open_gguf(gptq)
    assert plain.stat().st_size == gptq.stat().st_size
    with open(plain, "rb") as f, open(gptq, "rb") as g:
        start = min(t.data_offset for t in a.tensors)
        assert f.read(start) == g.read(start)  # header, metadata and tensor index identical
    cov = CovarianceFile(demo_cov)
    covered = [t.name for t in a.tensors if t.name in cov and len(t.shape) == 2]
    assert sorted(result["gptq_tensors"]) == sorted(covered) and len(covered) == 30 * 7
    for ta, tb in zip(a.tensors, b.tensors):
        assert (ta.name, ta.tensor_type, ta.data_offset, ta.n_bytes) == (tb.name, tb.tensor_type, tb.data_offset, tb.n_bytes)
        same = np.array_equal(np.asarray(ta.data), np.asarray(tb.data))
        assert same == (ta.name not in covered), ta.name
    assert {"token_embd.weight"} <= set(result["kept_tensors"])

    from nkat_gguf.measure.ppl import PplRequest, run_ppl
    from nkat_gguf.runtime.settings import RuntimeSettings

    scores = run_ppl(PplRequest(models=[str(plain), str(gptq)], text=str(short_text), reference=str(reference_model),
                                chunks=2, runtime=RuntimeSettings(ctx=256, threads=2), quiet=True))
    rows = {r["label"]: r for r in scores["rows"]}
    llama_row, gptq_row = rows[plain.name], rows[gptq.name]
    assert np.isfinite(gptq_row["ppl"]) and abs(gptq_row["ppl"] / llama_row["ppl"] - 1) < 0.15
    assert 0 < gptq_row["kld_mean"] < 2 * llama_row["kld_mean"]


def test_gptq_without_covariance_is_a_user_error(tmp_path, capsys):
    rc = main(["quantize", "--method", "gptq", "--output", str(tmp_path / "x.gguf")])
    assert rc == 2 and "--covariance" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_negative_damping_is_a_user_error(tmp_path, capsys, demo_cov):
    rc = main(["quantize", "--method", "gptq", "--covariance", str(demo_cov), "--damp", "-1",
               "--output", str(tmp_path / "x.gguf")])
    assert rc == 2 and "--damp" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_upper_factor_of_a_wide_input_is_upper_and_exact():
    """LAPACK's in-place factor and inverse (dpotrf, dtrtri) at a width of several blocks."""
    _, R = correlated(600, 1, seed=4)
    H = R + 0.01 * np.eye(600)
    U = upper_cholesky_of_inverse(H)
    assert np.array_equal(U, np.triu(U))
    inverse = np.linalg.inv(H)
    assert np.allclose(U.T @ U, inverse, rtol=1e-9, atol=1e-9 * np.abs(inverse).max())


def test_gptq_price_on_sampled_rows_is_the_whole_tensors_rounding_of_those_rows(demo_cov, reference_model):
    """The price of a GPTQ option is measured on sampled rows: GPTQ of those rows alone gives exactly
    the bytes the whole tensor's GPTQ gives them (a row's error moves only along that row), and its
    share of ggml's output error is below 1 under the covariance it was fitted to."""
    from nkat_gguf.formats.covariance import CovarianceFile
    from nkat_gguf.recipe.costs import Statistics, reference_rows, sample_rows
    from nkat_gguf.recipe.gptq_option import tensor_shares
    from nkat_gguf.runtime.gptq import gptq_factor

    cov = CovarianceFile(demo_cov)
    tensor = next(t for t in open_gguf(reference_model).tensors if t.name == "blk.4.ffn_down.weight")
    R = cov.autocorrelation(tensor.name)
    rows = sample_rows(int(tensor.shape[1]), 24)
    W = reference_rows(tensor, np.arange(int(tensor.shape[1])))
    for qtype in ("Q4_0", "Q3_K"):
        factor = gptq_factor(R, gq.block_size(qtype))
        whole = gptq_quantize_matrix(W, None, qtype, factor=factor)
        sampled = gptq_quantize_matrix(W[rows], None, qtype, factor=factor)
        assert np.array_equal(whole[rows], sampled), qtype
    imatrix_like = Statistics()
    shares = tensor_shares(tensor, imatrix_like, R, {}, ["Q4_0", "Q3_K"], 24, 0.1, 2)
    for qtype, share in shares.items():
        expected = output_error(W[rows], gq.dequantize_rows(qtype, gptq_quantize_matrix(
            W[rows], None, qtype, factor=gptq_factor(R, gq.block_size(qtype), 0.1)), W.shape[1]), R)
        assert share.gptq == pytest.approx(expected, rel=1e-9)
        assert share.plain == pytest.approx(output_error(W[rows], gq.roundtrip(qtype, W[rows]), R), rel=1e-9)
        assert 0 < share.ratio < 1, qtype


@pytest.mark.slow
def test_mix_gptq_rounds_the_chosen_types_again_at_the_same_bytes(demo_cov, reference_model, tmp_path):
    """nkat mix --gptq: the same allocation as without it, the file as long and of the same tensor
    types; tensors kept in the reference's own type byte-equal to the plain mix (llama.cpp copies
    them), every other covered tensor GPTQ's bytes for its type (equal to gptq_quantize_matrix on
    that tensor alone, so sharing one factor per input changes nothing), with less output error
    under the covariance than llama.cpp's rounding."""
    from nkat_gguf.formats.covariance import CovarianceFile
    from nkat_gguf.formats.gguf_io import ModelFile
    from nkat_gguf.recipe.mix import MixOptions, run_mix
    from nkat_gguf.recipe.report import mix_markdown
    from nkat_gguf.runtime.settings import RuntimeSettings

    def mix(gptq):
        opts = MixOptions(reference=str(reference_model), output=str(tmp_path / f"m{bool(gptq)}.gguf"),
                          work_dir=str(tmp_path / "w"), budgets=["4.8bpw"], rows=16,
                          types=["Q4_0", "Q4_1", "Q5_0", "Q8_0"], fit_chunks=0, gptq=gptq,
                          runtime=RuntimeSettings(ctx=128, threads=2), quiet=True)
        result = run_mix(opts)
        assert ("rounded again by GPTQ" in mix_markdown(result)) == bool(gptq)
        return result["mixes"][0]

    plain, rounded = mix(None), mix(str(demo_cov))
    types = lambda mix: [(t["name"], t["type"]) for t in mix["tensors"]]  # noqa: E731
    assert types(rounded) == types(plain) and rounded["file_bytes"] == plain["file_bytes"]
    a, b = open_gguf(plain["output"]), open_gguf(rounded["output"])
    ref, cov = ModelFile(str(reference_model)), CovarianceFile(demo_cov)
    ref_types = {t.name: t.tensor_type.name for t in open_gguf(reference_model).tensors}
    rewritten, error_plain, error_gptq = [], 0.0, 0.0
    for ta, tb in zip(a.tensors, b.tensors):
        assert (ta.name, ta.tensor_type, ta.n_bytes) == (tb.name, tb.tensor_type, tb.n_bytes)
        same = np.array_equal(np.asarray(ta.data), np.asarray(tb.data))
        covered = ta.name in cov and len(ta.shape) == 2 and ta.name not in ("token_embd.weight", "output.weight")
        assert same == (not covered or ref_types[ta.name] == ta.tensor_type.name), ta.name
        if not same:
            rewritten.append(ta.name)
            W, R = ref.dequantize(ta.name), cov.autocorrelation(ta.name)
            n_in = W.shape[1]
            error_plain += output_error(W, gq.dequantize_rows(ta.tensor_type, np.asarray(ta.data), n_in), R)
            error_gptq += output_error(W, gq.dequantize_rows(tb.tensor_type, np.asarray(tb.data), n_in), R)
    assert len(rewritten) >= 10 and set(rewritten) == {t["name"] for t in rounded["tensors"] if t["gptq"]}
    assert error_gptq < 0.9 * error_plain
    for name in (rewritten[0], rewritten[-1]):
        t = next(x for x in b.tensors if x.name == name)
        alone = gptq_quantize_matrix(ref.dequantize(name), cov.autocorrelation(name), t.tensor_type)
        assert np.array_equal(alone.reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), name


@pytest.mark.slow
def test_mix_prices_gptq_as_an_option_and_rounds_only_the_chosen_tensors(demo_cov, reference_model, tmp_path):
    """nkat mix --gptq --gptq-priced: GPTQ is one more option per covered matrix and type, priced at the type's bytes.
    The file is within the budget; the tensors the allocation gave a GPTQ option are exactly those whose
    bytes differ from llama.cpp's file of the same types, each equal to gptq_quantize_matrix on that
    tensor alone (sharing one factor per input changes nothing), with less output error under the
    covariance than llama.cpp's rounding; the cached prices are reused by a second run."""
    from nkat_gguf.formats.covariance import CovarianceFile
    from nkat_gguf.formats.gguf_io import ModelFile
    from nkat_gguf.recipe.mix import MixOptions, run_mix
    from nkat_gguf.recipe.report import mix_markdown
    from nkat_gguf.runtime.settings import RuntimeSettings

    work = tmp_path / "w"

    def mix(gptq):
        opts = MixOptions(reference=str(reference_model), output=str(tmp_path / f"m{bool(gptq)}.gguf"),
                          work_dir=str(work), budgets=["4.8bpw"], rows=16,
                          types=["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q3_K"], fit_chunks=0, gptq=gptq,
                          gptq_priced=bool(gptq), runtime=RuntimeSettings(ctx=128, threads=2), quiet=True)
        result = run_mix(opts)
        assert ("offered as one more option" in mix_markdown(result)) == bool(gptq)
        return result["mixes"][0], result

    plain, _ = mix(None)
    rounded, result = mix(str(demo_cov))
    assert rounded["file_bytes"] <= rounded["budget_bytes"] and rounded["label"].endswith("gptq")
    assert rounded["predicted_damage"] < plain["predicted_damage"]  # the GPTQ options are priced in
    chosen = {t["name"] for t in rounded["tensors"] if t["gptq"]}
    assert rounded["gptq_matrices"] == len(chosen) >= 10
    gptq_file = Path(rounded["model"])
    twin = [p for p in work.glob("mix-*.gguf") if gptq_file.name.startswith(p.stem + "-gptq")]
    assert len(twin) == 1  # llama.cpp's file of the same types, cached in the work dir
    a, b = open_gguf(twin[0]), open_gguf(gptq_file)
    ref, cov = ModelFile(str(reference_model)), CovarianceFile(demo_cov)
    error_plain, error_gptq, rewritten = 0.0, 0.0, []
    for ta, tb in zip(a.tensors, b.tensors):
        assert (ta.name, ta.tensor_type, ta.n_bytes) == (tb.name, tb.tensor_type, tb.n_bytes)
        if np.array_equal(np.asarray(ta.data), np.asarray(tb.data)):
            continue
        rewritten.append(ta.name)
        W, R = ref.dequantize(ta.name), cov.autocorrelation(ta.name)
        n_in = W.shape[1]
        error_plain += output_error(W, gq.dequantize_rows(ta.tensor_type, np.asarray(ta.data), n_in), R)
        error_gptq += output_error(W, gq.dequantize_rows(tb.tensor_type, np.asarray(tb.data), n_in), R)
    assert set(rewritten) == chosen
    assert error_gptq < 0.9 * error_plain
    for name in (rewritten[0], rewritten[-1]):
        t = next(x for x in b.tensors if x.name == name)
        alone = gptq_quantize_matrix(ref.dequantize(name), cov.autocorrelation(name), t.tensor_type)
        assert np.array_equal(alone.reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), name
    assert "gptq prices" in result["timings"] and len(list(work.glob("gptq-shares-*.json"))) == 1
    again = run_mix(MixOptions(reference=str(reference_model), output=str(tmp_path / "again.gguf"),
                               work_dir=str(work), budgets=["4.8bpw"], rows=16,
                               types=["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q3_K"], fit_chunks=0, gptq=str(demo_cov),
                               gptq_priced=True, runtime=RuntimeSettings(ctx=128, threads=2), quiet=True))
    assert again["mixes"][0]["tensors"] == rounded["tensors"] and again["timings"]["gptq prices"] < 2
