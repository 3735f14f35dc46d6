"""Theta as one more option of nkat mix's allocation, on the demo model with real llama.cpp: the
priced gains are the residual's singular values (numpy's SVD of what llama.cpp wrote), and where
no type can spend the bytes the allocation takes theta, writes a .nkat within the budget that
llama.cpp loads, and the measured KLD falls."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize

from nkat_gguf.formats.gguf_io import open_gguf
from nkat_gguf.recipe.costs import Statistics
from nkat_gguf.recipe.theta_option import THETA_RANKS, residual_gain, split_recipe


def test_gains_are_the_singular_values_of_what_llamacpp_wrote(reference_model, base_model):
    """base_model is llama.cpp's Q4_0 of the reference without an imatrix: its residual's S^2 (numpy,
    gguf-py's dequantization of both files) equal the priced gains, and the energy their sum."""
    ref = {t.name: t for t in open_gguf(reference_model).tensors}
    base = {t.name: t for t in open_gguf(base_model).tensors}
    for name in ("blk.0.attn_q.weight", "blk.3.ffn_down.weight"):
        shape = (int(ref[name].shape[1]), int(ref[name].shape[0]))
        E = (dequantize(ref[name].data, ref[name].tensor_type).reshape(shape)
             - dequantize(base[name].data, base[name].tensor_type).reshape(shape)).astype(np.float64)
        s2 = np.linalg.svd(E, compute_uv=False) ** 2
        gain = residual_gain(ref[name], Statistics(), "Q4_0", max(THETA_RANKS), None)
        assert gain.energy == pytest.approx(s2.sum(), rel=1e-4)
        assert gain.s2[0] == pytest.approx(s2[0], rel=1e-4)
        for r in THETA_RANKS:  # the randomized SVD's tail is within 1 %, never above the exact one
            exact = s2[:r].sum()
            assert exact * 0.99 <= sum(gain.s2[:r]) <= exact * (1 + 1e-6), (name, r)
            assert gain.kept_share(r) == pytest.approx(1 - sum(gain.s2[:r]) / gain.energy)


@pytest.fixture(scope="module")
def imatrix(tmp_path_factory, reference_model):
    from nkat_gguf.formats.defaults import find_calibration_text
    from nkat_gguf.formats.imatrix import write_imatrix
    from nkat_gguf.measure.ppl import read_text
    from nkat_gguf.runtime.activation_stats import collect

    stats, facts = collect(str(reference_model), read_text(find_calibration_text()), 2, 128, None, False, True)
    return str(write_imatrix(tmp_path_factory.mktemp("imat") / "ref.imatrix", stats, chunks=facts["chunks"],
                             chunk_size=128))


def test_theta_is_taken_where_no_type_can_spend_the_bytes(reference_model, imatrix, eval_text, tmp_path):
    """One candidate type (Q4_0) and 1 MiB more than its file: only ranks can spend them (offered to
    the first three blocks' matrices, to keep the test short). The
    allocation takes theta, GGUF + .nkat stay within the budget, the .nkat holds the recipe's ranks,
    and llama.cpp measures a lower KLD with it than without."""
    from nkat_gguf.measure.scoring import RowKind, ScoredRow, score_rows
    from nkat_gguf.recipe.build import MixBuilder
    from nkat_gguf.recipe.mix import MixOptions, run_mix
    from nkat_gguf.runtime.settings import RuntimeSettings

    work = tmp_path / "w"
    smallest = MixBuilder(str(reference_model), imatrix, work, rows=16, types=["Q4_0"], quiet=True).smallest
    budget = smallest + (1 << 20)
    runtime = RuntimeSettings(ctx=128, threads=2)
    opts = MixOptions(reference=str(reference_model), output=str(tmp_path / "m.gguf"), work_dir=str(work),
                      budgets=[f"{budget / (1 << 20)}MiB"], imatrix=imatrix, rows=16, types=["Q4_0"], theta=True,
                      theta_layers=["blk.0.*", "blk.1.*", "blk.2.*"],
                      text=str(eval_text), chunks=3, runtime=runtime, quiet=True)
    m = run_mix(opts)["mixes"][0]
    assert m["theta_matrices"] > 0 and m["theta"] and m["theta_output"]
    assert m["file_bytes"] == m["gguf_bytes"] + m["theta_bytes"] <= m["budget_bytes"]
    assert m["predicted_bytes"] <= m["budget_bytes"]
    assert set(m["type_counts"]) == {"Q4_0"}
    ranks = {t["name"]: t["theta_rank"] for t in m["tensors"] if t["theta_rank"]}
    assert len(ranks) == m["theta_matrices"] and set(ranks.values()) <= set(THETA_RANKS)
    assert all(n.split(".")[1] in ("0", "1", "2") for n in ranks)
    adapter = {t.name: t for t in open_gguf(m["theta_output"]).tensors}
    for name, rank in ranks.items():
        assert int(adapter[name.removesuffix(".weight") + ".weight.lora_a"].shape[1]) == rank
    assert split_recipe({"a": "Q4_0+r16", "b": "Q8_0"}) == ({"a": "Q4_0", "b": "Q8_0"}, {"a": 16})
    plain = ScoredRow("plain", RowKind.MIX, m["model"])
    score_rows([plain], reference=str(reference_model), text=str(eval_text), work=work, runtime=runtime, chunks=3,
               quiet=True)
    # the same tokens scored with and without the adapter (measured here: 0.277 against 0.309)
    assert m["kld_mean"] < 0.97 * plain.kld_mean, (m["kld_mean"], plain.kld_mean)


def test_theta_is_priced_for_chosen_and_next_cheaper_types_never_the_reference_type():
    """A tensor kept in the reference's own type is copied as stored by llama.cpp: nothing to correct."""
    from nkat_gguf.recipe.costs import TensorCost
    from nkat_gguf.recipe.theta_option import types_to_price

    options = {"Q2_K": (100, 9.0), "Q3_K": (150, 4.0), "Q4_K": (200, 1e-9), "Q6_K": (300, 0.5)}
    costs = {"blk.0.attn_q.weight": TensorCost("blk.0.attn_q.weight", 8, 256, "Q4_K", 100.0, options),
             "blk.0.attn_k.weight": TensorCost("blk.0.attn_k.weight", 8, 256, "Q4_K", 100.0, options),
             "token_embd.weight": TensorCost("token_embd.weight", 8, 256, "Q4_K", 100.0, options)}
    chosen = [{"blk.0.attn_q.weight": "Q3_K", "blk.0.attn_k.weight": "Q4_K", "token_embd.weight": "Q3_K"}]
    wanted = types_to_price(costs, chosen)
    assert wanted == {"blk.0.attn_q.weight": ["Q3_K", "Q2_K"], "blk.0.attn_k.weight": ["Q3_K"]}
    assert types_to_price(costs, chosen, ["blk.*.attn_k.weight"]) == {"blk.0.attn_k.weight": ["Q3_K"]}
