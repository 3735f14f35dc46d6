"""Perplexity, KLD and TPE on the real default model, against independent computations."""

import math

import numpy as np
import pytest
from scipy.special import log_softmax as scipy_log_softmax

from nkat_gguf.measure.evaluate import chunk_count, evaluate, tpe
from nkat_gguf.errors import UserError
from nkat_gguf.measure.ppl import PplRequest, run_ppl
from nkat_gguf.runtime.settings import RuntimeSettings
from nkat_gguf.runtime.engine import Runtime

CTX = 256        # the quality comparison (theta against the base) needs this many positions
EXACT_CTX = 64   # the identities (numpy vs the evaluator, a model against itself, gamma 0) hold at any length


@pytest.fixture(scope="module")
def tokens_and_runtime(reference_model, short_text):
    rt = Runtime(reference_model, n_ctx=EXACT_CTX)
    tokens = rt.tokenize(short_text.read_bytes())
    yield tokens, rt
    rt.close()


def test_ppl_equals_numpy_over_full_logits(tokens_and_runtime):
    """The evaluator requests only scored positions' logits; numpy recomputes from all logits."""
    tokens, rt = tokens_and_runtime
    res = evaluate({"m": rt}, tokens, EXACT_CTX, chunks=2, quiet=True)["m"]
    nll = []
    for c in range(2):
        window = tokens[c * EXACT_CTX:(c + 1) * EXACT_CTX]
        rt.clear()
        logits = np.array(rt.decode(window, 0, logits_from=0), dtype=np.float64)  # every position
        first = EXACT_CTX // 2
        logp = scipy_log_softmax(logits[first:EXACT_CTX - 1], axis=1)
        nll.extend(-logp[np.arange(EXACT_CTX - 1 - first), window[first + 1:]])
    expected = math.exp(np.mean(nll))
    assert res["tokens"] == 2 * (EXACT_CTX - 1 - EXACT_CTX // 2)
    assert res["ppl"] == pytest.approx(expected, rel=1e-4)
    assert 5 < res["ppl"] < 200


def test_kld_of_a_model_against_itself_is_zero(tokens_and_runtime, reference_model):
    tokens, rt = tokens_and_runtime
    twin = Runtime(reference_model, n_ctx=EXACT_CTX)
    try:
        res = evaluate({"m": rt}, tokens, EXACT_CTX, chunks=2, reference=twin, quiet=True)
    finally:
        twin.close()
    assert res["m"]["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert res["m"]["top1_agreement"] == 1.0
    assert res["m"]["ppl"] == pytest.approx(res["reference"]["ppl"], rel=1e-6)


def test_tpe_without_theta_is_one_over_ppl():
    assert tpe(24.39) == pytest.approx(1 / 24.39, rel=1e-12)
    # 2.5 % extra bytes cost about 1 % of TPE (README, **TPE**)
    assert tpe(24.39, 25, 1000) / tpe(24.39) == pytest.approx(0.99, abs=0.002)


def test_too_short_text_is_a_user_error():
    with pytest.raises(UserError, match="at least two chunks"):
        chunk_count(700, 512, None)


def test_gamma_zero_is_bit_identical_and_recovers_nothing(base_model, theta_r8, reference_model, short_text):
    base = Runtime(base_model, n_ctx=EXACT_CTX)
    off = Runtime(base_model, theta_r8, gamma=0.0, n_ctx=EXACT_CTX)
    on = Runtime(base_model, theta_r8, n_ctx=EXACT_CTX)
    try:
        tokens = base.tokenize(short_text.read_bytes())[:EXACT_CTX]
        a = np.array(base.decode(tokens, 0, logits_from=0))
        b = np.array(off.decode(tokens, 0, logits_from=0))
        c = np.array(on.decode(tokens, 0, logits_from=0))
    finally:
        for rt in (base, off, on):
            rt.close()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3  # theta at its gamma does change the logits
    res = run_ppl(PplRequest(models=[str(base_model)], text=str(short_text), thetas=[str(theta_r8)], gamma=0.0,
                             reference=str(reference_model), runtime=RuntimeSettings(ctx=EXACT_CTX), chunks=2, quiet=True))
    assert res["gap_recovered"] == 0.0
    assert res["ppl"] == res["ppl_base"]


def test_residual_theta_moves_the_demo_pair_towards_the_reference(base_model, theta_r8, reference_model, short_text):
    res = run_ppl(PplRequest(models=[str(base_model)], text=str(short_text), thetas=[str(theta_r8)],
                             reference=str(reference_model), runtime=RuntimeSettings(ctx=CTX), chunks=4, quiet=True))
    rows = {r["label"]: r for r in res["rows"]}
    base_row = rows[base_model.name]
    assert res["ppl_reference"] < res["ppl_base"]          # the pair really differs
    assert res["kld_mean"] < base_row["kld_mean"]          # theta brings the distributions closer
    assert res["ppl"] < res["ppl_base"] and res["gap_recovered"] > 0.01  # rank 8 recovers a little
    assert res["rho"] == pytest.approx(theta_r8.stat().st_size / base_model.stat().st_size, rel=0.01)
    for key in ("ppl", "ppl_err", "tokens", "tpe", "rho", "ppl_reference", "kld_mean", "kld_p99",
                "top1_agreement", "gap_recovered"):
        assert res[key] is not None, key
