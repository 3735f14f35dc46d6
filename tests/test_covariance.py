"""Covariance calibration through the native hook, its file, and residual-cov / budgeted theta on
the demo pair: against numpy on captured activations, the imatrix collector, and the budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CALIB_CHUNKS, CALIB_CTX
from test_calibrate import first_layer_inputs

from nkat_gguf.runtime import native
from nkat_gguf.formats.imatrix import read_imatrix
from nkat_gguf.cli import main
from nkat_gguf.theta.convert import ConvertOptions, convert
from nkat_gguf.formats.covariance import CovarianceFile, covariance_writer, input_of
from nkat_gguf.formats.nkat_format import read_layout
from nkat_gguf.runtime.engine import Runtime


def test_shared_inputs_are_collected_once():
    names = [f"blk.0.{w}.weight" for w in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                            "ffn_down")] + ["blk.1.attn_k.weight"]
    owners = input_of(names)
    assert owners["blk.0.attn_k.weight"] == owners["blk.0.attn_v.weight"] == "blk.0.attn_q.weight"
    assert owners["blk.0.ffn_up.weight"] == "blk.0.ffn_gate.weight"
    assert owners["blk.0.attn_output.weight"] == "blk.0.attn_output.weight"
    assert owners["blk.1.attn_k.weight"] == "blk.1.attn_k.weight"  # no attn_q in block 1: its own


def test_file_round_trip_and_no_partial_file(tmp_path):
    rng = np.random.default_rng(3)
    sums = {"blk.0.attn_q.weight": rng.standard_normal((8, 8)), "blk.0.ffn_down.weight": rng.standard_normal((16, 16))}
    users = {"blk.0.attn_q.weight": "blk.0.attn_q.weight", "blk.0.attn_k.weight": "blk.0.attn_q.weight",
             "blk.0.ffn_down.weight": "blk.0.ffn_down.weight"}
    path = tmp_path / "c.cov"
    with covariance_writer(path, {k: v.shape[0] for k, v in sums.items()}, users, ["t.txt"], 2, 64, "llama") as write:
        for name, total in sums.items():
            write(name, total, 128)
    cov = CovarianceFile(path)
    total, count = cov.sum_and_count("blk.0.attn_k.weight")
    assert count == 128 and np.allclose(total, sums["blk.0.attn_q.weight"], rtol=1e-6)
    np.testing.assert_allclose(cov.autocorrelation("blk.0.ffn_down.weight"), sums["blk.0.ffn_down.weight"] / 128, rtol=1e-6)
    # an interrupted writer leaves nothing behind
    broken = tmp_path / "broken.cov"
    with pytest.raises(ValueError, match="incomplete"):
        with covariance_writer(broken, {k: v.shape[0] for k, v in sums.items()}, users, [], 1, 64, "llama") as write:
            write("blk.0.attn_q.weight", sums["blk.0.attn_q.weight"], 64)
    assert not broken.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.cov"]


@pytest.mark.slow
def test_hook_covariance_matches_numpy_on_captured_tokens(base_model, calib_text):
    targets = {"blk.0.attn_q.weight": 576, "blk.0.ffn_down.weight": 1536}
    collector = native.CovarianceCollector(targets, columns=64)
    with Runtime(base_model, n_ctx=64, n_threads=2, eval_callback=collector) as rt:
        tokens = rt.tokenize(calib_text.read_bytes()[:20_000])[:40]
        for start in (0, 20):  # two decodes: the sums add up
            rt.decode(tokens[start:start + 20], start, logits_from=0)
            assert collector.check()["skipped"] == 0
            collector.add_captured()
    results = collector.results()
    collector.close()
    x = first_layer_inputs(base_model, tokens)
    total, count = results["blk.0.attn_q.weight"]
    assert count == 40 and total.dtype == np.float64 and total.shape == (576, 576)
    want = x.T @ x
    np.testing.assert_allclose(total, want, rtol=2e-3, atol=2e-4 * np.abs(want).max())
    down, count = results["blk.0.ffn_down.weight"]
    assert count == 40 and np.allclose(down, down.T) and np.all(np.linalg.eigvalsh(down) > -1e-3 * down.max())


@pytest.fixture(scope="module")
def calibrated(base_covariance, base_imatrix):
    """The session's covariance file (several passes: a small --max-memory) and imatrix, on the same text."""
    return base_covariance, base_imatrix


@pytest.mark.slow
def test_covariance_diagonal_equals_imatrix(calibrated):
    cov_path, imatrix_path = calibrated
    cov, stats = CovarianceFile(cov_path), read_imatrix(imatrix_path)
    assert set(cov.users) == set(stats) and len(stats) == 210
    assert len(set(cov.users.values())) == 120  # 30 blocks x (qkv, o, gate/up, down)
    for name, (sum_sq, count) in stats.items():
        diag, cov_count = cov.diagonal(name)
        assert cov_count == count == CALIB_CHUNKS * CALIB_CTX
        np.testing.assert_allclose(diag, sum_sq, rtol=1e-4, atol=1e-6 * sum_sq.max())


@pytest.mark.slow
def test_max_memory_below_one_block_is_a_user_error(base_model, calib_text, tmp_path, capsys):
    out = tmp_path / "x.cov"
    rc = main(["calibrate", "--covariance", "--max-memory", "1M", "--model", str(base_model), "--text",
               str(calib_text), "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--max-memory" in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_residual_cov_and_budget_on_the_demo_pair(calibrated, base_model, reference_model, tmp_path):
    cov, imatrix = calibrated
    layers = ["blk.1.*", "blk.2.*"]
    uniform = convert(str(base_model), str(tmp_path / "u.nkat"), ConvertOptions(
        rank=8, source="residual-cov", reference=str(reference_model), covariance=str(cov), layers=layers, quiet=True))
    assert uniform.tensors == 14 and uniform.diagonal_fallback == 0
    budgets, previous = [], None
    for mb in (0.05, 0.15, 0.4):
        out = tmp_path / f"b{mb}.nkat"
        s = convert(str(base_model), str(out), ConvertOptions(
            rank=8, source="residual-cov", reference=str(reference_model), covariance=str(cov), layers=layers,
            budget_mb=mb, quiet=True))
        assert out.stat().st_size <= mb * 2**20  # the whole file, headers included
        _, pairs = read_layout(out)
        ranks = {name: int(a.shape[1]) for name, (a, _) in pairs.items()}
        assert ranks == s.ranks
        if previous is not None:  # monotone: no matrix loses rank, none disappears
            assert all(ranks.get(n, 0) >= r for n, r in previous.items())
        previous = ranks
        budgets.append(s)
    assert budgets[0].tensors < 14  # a small budget leaves matrices out entirely
    capped = convert(str(base_model), str(tmp_path / "cap.nkat"), ConvertOptions(
        rank=8, source="residual-cov", reference=str(reference_model), covariance=str(cov), layers=layers,
        budget_mb=0.4, max_matrices=3, quiet=True))
    assert capped.tensors == 3


@pytest.mark.slow
def test_residual_cov_falls_back_to_the_diagonal_with_a_notice(calibrated, base_model, reference_model, tmp_path,
                                                                 capsys):
    _, imatrix = calibrated
    out = tmp_path / "fallback.nkat"
    rc = main(["convert", "--model", str(base_model), "--reference", str(reference_model), "--source",
               "residual-cov", "--imatrix", str(imatrix), "--selective-layers", "blk.3.*", "--theta-rank", "4",
               "--output", str(out), "--json", "--check-chunks", "0"])  # the keep-or-refuse check: test_guide_workflow
    captured = capsys.readouterr()
    assert rc == 0 and json.loads(captured.out)["diagonal_fallback"] == 7
    assert captured.err.count("\n") == 1 and "only diagonal statistics" in captured.err
