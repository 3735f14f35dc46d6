"""The role x depth fit of `nkat mix` (recipe.fit): on synthetic probes made from known weights it
recovers them and ranks held-out probes perfectly; a real probe file is the reference with only the
probe's tensors requantized (every other tensor copied byte for byte by llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.recipe import fit as fitting
from nkat_gguf.recipe.costs import TensorCost

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def synthetic_costs(n_blocks=8, seed=0) -> dict[str, TensorCost]:
    rng = np.random.default_rng(seed)
    costs = {}
    for name in ["token_embd.weight"] + [f"blk.{b}.{r}.weight" for b in range(n_blocks) for r in ROLES] + \
            ["output.weight"]:
        energy = float(rng.uniform(1, 10))
        rel = float(rng.uniform(0.01, 0.05))
        costs[name] = TensorCost(name, 256, 256, "Q4_K", energy, {"Q3_K": (1000, rel * energy), "Q4_K": (1200, 0.0)})
    return costs


def test_fit_recovers_known_role_and_depth_weights():
    costs = synthetic_costs()
    true_role = {"token_embd": 0.5, "output": 3.0, "attn_q": 0.05, "attn_k": 0.08, "attn_v": 0.3,
                 "attn_output": 0.2, fitting.GATE_UP: 0.12, "ffn_down": 0.4}
    true_depth = np.array([1.6, 0.7, 0.5, 1.2])
    true_depth /= true_depth.mean()

    def truth(name):
        role, q = fitting.role_and_quarter(name, 8)
        return true_role[role] * (true_depth[q] if q is not None else 1.0)

    plan = fitting.probes(costs)
    assert sum(p.held_out for p in plan) == len(fitting.HELD_OUT)
    assert {p.name for p in plan if not p.held_out} >= {"token_embd", "output", "role attn_v", "quarter 3"}
    for p in plan:  # an exactly additive world: measured KLD = sum of true weight x relative damage
        p.kld = sum(truth(n) * d for n, d in p.rel_damage.items())
    result = fitting.fit(plan, costs)
    for name in costs:
        assert result.weight(name) == pytest.approx(truth(name), rel=1e-6)
    assert result.spearman_held_out == pytest.approx(1.0)
    assert all(r == pytest.approx(1.0, rel=1e-6) for r in result.held_out_ratio)
    # without the check (nkat mix's default) the same weights come from the fitted probes alone
    unchecked = fitting.probes(costs, held_out=False)
    assert [p.name for p in unchecked] == [p.name for p in plan if not p.held_out]
    for p in unchecked:
        p.kld = sum(truth(n) * d for n, d in p.rel_damage.items())
    alone = fitting.fit(unchecked, costs)
    assert all(alone.weight(n) == pytest.approx(result.weight(n), rel=1e-9) for n in costs)
    assert alone.spearman_held_out is None and alone.held_out_ratio == []


def test_an_outlier_tensor_gets_its_own_probe_and_weight():
    """A tensor whose output energy is dominated by a few huge activations (relative damage 100x
    below its role's) but whose KLD per unit of relative damage is 60x its role's: relative error
    alone would under-rate it. It is probed alone, its weight is its own, and the role x depth
    weights of the others are still recovered exactly."""
    costs = synthetic_costs(seed=2)
    odd = "blk.2.ffn_down.weight"
    c = costs[odd]
    costs[odd] = TensorCost(odd, 256, 256, "Q4_K", c.energy * 100, {"Q3_K": (1000, c.options["Q3_K"][1]),
                                                                     "Q4_K": (1200, 0.0)})
    true_role = {"token_embd": 0.5, "output": 3.0, "attn_q": 0.05, "attn_k": 0.08, "attn_v": 0.3,
                 "attn_output": 0.2, fitting.GATE_UP: 0.12, "ffn_down": 0.4}
    true_depth = np.array([1.3, 0.9, 0.8, 1.0])

    def truth(name):
        if name == odd:
            return 0.4 * true_depth[1] * 60
        role, q = fitting.role_and_quarter(name, 8)
        return true_role[role] * (true_depth[q] if q is not None else 1.0)

    assert fitting.outliers(costs) == [odd]
    plan = fitting.probes(costs)
    assert [p.members for p in plan if p.name.startswith(fitting.TENSOR_PROBE)] == [[odd]]
    for p in plan:
        p.kld = sum(truth(n) * d for n, d in p.rel_damage.items())
    result = fitting.fit(plan, costs)
    scale = result.weight("blk.0.attn_q.weight") / truth("blk.0.attn_q.weight")  # depth x role: one free scale
    for name in costs:
        assert result.weight(name) == pytest.approx(truth(name) * (1.0 if name == odd else scale), rel=1e-6), name
    assert result.tensor_weight == {odd: pytest.approx(truth(odd))}
    assert result.spearman_held_out == pytest.approx(1.0)


def test_fit_ranks_held_out_probes_when_the_world_is_not_a_product():
    """Weights that are not role x depth (one block's attn_v 5x): the fit cannot be exact, and the
    held-out probe containing that block must show it."""
    costs = synthetic_costs(seed=1)

    def truth(name):
        return 5.0 if name == "blk.4.attn_v.weight" else 1.0

    plan = fitting.probes(costs)
    for p in plan:
        p.kld = sum(truth(n) * d for n, d in p.rel_damage.items())
    result = fitting.fit(plan, costs)
    held = {p.name: p for p in plan if p.held_out}
    assert held["held attn_v q2"].predicted < held["held attn_v q2"].kld  # blk 4 is in quarter 2 of 8 blocks
    assert min(result.held_out_ratio) < 0.9 < max(result.held_out_ratio)


def test_probe_file_copies_every_other_tensor_as_stored(reference_model, tmp_path):
    """llama.cpp writes the probe's members at the probe type and copies the rest byte for byte."""
    from nkat_gguf.formats.gguf_io import open_gguf
    from nkat_gguf.recipe.build import MixBuilder
    from nkat_gguf.recipe.layout import tensor_types

    builder = MixBuilder(str(reference_model), None, tmp_path, rows=8, types=["Q4_0", "Q4_1", "Q8_0"], quiet=True)
    plan = fitting.probes(builder.costs)
    probe = next(p for p in plan if p.name == "held attn_v q2")
    recipe = fitting.probe_recipe(probe, builder.costs, tensor_types(reference_model))
    path = builder.write(recipe)
    ref = {t.name: t for t in open_gguf(reference_model).tensors}
    changed = 0
    for t in open_gguf(path).tensors:
        same = t.tensor_type == ref[t.name].tensor_type and np.array_equal(
            np.asarray(t.data).view(np.uint8), np.asarray(ref[t.name].data).view(np.uint8))
        if t.name in probe.members:
            assert t.tensor_type.name == "Q4_0" and not same
            changed += 1
        else:
            assert same, t.name
    assert changed == len(probe.members) > 0


@pytest.fixture(scope="module")
def probed(reference_model, tmp_path_factory):
    """nkat mix with probes on the demo model (1 calibration chunk of 128 tokens: no quality compared)."""
    from nkat_gguf.recipe.mix import MixOptions, run_mix
    from nkat_gguf.runtime.settings import RuntimeSettings

    tmp_path = tmp_path_factory.mktemp("probed")
    opts = MixOptions(reference=str(reference_model), output=str(tmp_path / "m.gguf"), work_dir=str(tmp_path / "w"),
                      budgets=["5.2bpw"], rows=16, types=["Q4_0", "Q4_1", "Q5_0", "Q8_0"], calib_chunks=1,
                      fit_chunks=1, fit_check=True, runtime=RuntimeSettings(ctx=128, threads=2), quiet=True)
    return opts, run_mix(opts)


def test_mix_with_probes_fits_weights_and_leaves_no_probe_files(probed, tmp_path):
    """nkat mix's probe stage on the demo model: every probe measured once (a rerun measures none),
    no probe file left behind, positive weights, and the allocation then uses them."""
    from nkat_gguf.recipe.mix import MixOptions, run_mix

    opts, result = probed
    fit = result["fit"]
    # token_embd (tied to the output: no output.weight), 6 block roles, 4 quarters; 8 held out
    assert sum(not p["held_out"] for p in fit["probes"]) == 11
    assert sum(p["held_out"] for p in fit["probes"]) == len(fitting.HELD_OUT)
    assert all(p["kld"] is not None and p["kld"] >= 0 for p in fit["probes"])
    assert all(w > 0 for w in fit["role_weight"].values()) and len(fit["depth_weight"]) == fitting.QUARTERS
    assert fit["spearman_held_out"] is not None
    work = Path(opts.work_dir)
    mixes = {m["model"] for m in result["mixes"]}
    assert {str(p) for p in work.glob("mix-*.gguf")} == mixes  # probe files deleted once scored
    m = result["mixes"][0]
    assert m["predicted_kld"] == pytest.approx(m["predicted_damage"])  # damage is in fitted KLD units
    assert m["refine"] is None
    stored = (work / "probes.json").read_text()
    again = run_mix(MixOptions(**{**opts.__dict__, "output": str(tmp_path / "again.gguf")}))
    assert (work / "probes.json").read_text() == stored  # nothing measured twice
    assert again["fit"]["role_weight"] == fit["role_weight"]
    # without --fit-check (the default): the fitted probes alone, the same weights, the report says so
    from nkat_gguf.recipe.report import mix_markdown

    unchecked = run_mix(MixOptions(**{**opts.__dict__, "output": str(tmp_path / "u.gguf"), "fit_check": False}))
    assert (work / "probes.json").read_text() == stored
    assert not any(p["held_out"] for p in unchecked["fit"]["probes"]) and unchecked["fit"]["spearman_held_out"] is None
    assert unchecked["fit"]["role_weight"] == fit["role_weight"]
    assert "--fit-check does" in mix_markdown(unchecked)


def calibration_kld(opts, model: str, work: Path) -> float:
    """The model's KLD on the probes' calibration chunks, scored afresh in another work dir."""
    from nkat_gguf.formats.defaults import find_calibration_text
    from nkat_gguf.measure.scoring import RowKind, Scorer, ScoredRow

    scorer = Scorer(reference=opts.reference, text=str(find_calibration_text()), work=work, runtime=opts.runtime,
                    chunks=opts.fit_chunks, quiet=True)
    return scorer.score(ScoredRow("x", RowKind.MIX, model)).kld_mean


def test_refine_keeps_the_best_measured_trial_within_the_budget(probed, tmp_path):
    """--refine on the demo model: trial 0 is the unrefined mix, the chosen file is the best trial's
    (both KLDs checked by scoring the files afresh), it fits the budget, only its file is left in the
    work dir, and a rerun measures nothing again."""
    import optuna

    from nkat_gguf.recipe.layout import tensor_types
    from nkat_gguf.recipe.mix import MixOptions, run_mix

    opts, plain = probed
    work = Path(opts.work_dir)
    refined_opts = MixOptions(**{**opts.__dict__, "output": str(tmp_path / "r.gguf"), "refine": 4})
    result = run_mix(refined_opts)
    m, search = result["mixes"][0], result["mixes"][0]["refine"]
    assert search["trials"] == 4 and search["chunks"] == 1
    assert search["kld_after"] <= search["kld_before"]
    unrefined = plain["mixes"][0]["model"]
    assert calibration_kld(opts, unrefined, tmp_path / "s1") == pytest.approx(search["kld_before"], rel=1e-9)
    assert calibration_kld(opts, m["model"], tmp_path / "s2") == pytest.approx(search["kld_after"], rel=1e-9)
    assert (search["best_trial"] == 0) == (m["model"] == unrefined)
    assert m["file_bytes"] <= m["budget_bytes"]
    assert tensor_types(m["output"]) == tensor_types(m["model"])
    left = {str(p) for p in work.glob("mix-*.gguf")} - {unrefined}
    assert left <= {m["model"]}  # every other trial's file deleted once measured
    scores = (work / "scores.json").read_text()
    again = run_mix(MixOptions(**{**refined_opts.__dict__, "output": str(tmp_path / "r2.gguf")}))
    assert again["mixes"][0]["refine"] == search
    assert (work / "scores.json").read_text() == scores  # no trial measured twice
    storage = f"sqlite:///{(work / 'refine.db').resolve()}"
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 4


def test_refine_offsets_scale_role_and_quarter_weights():
    from nkat_gguf.recipe.refine import groups, offset_weight

    names = [f"blk.{b}.{r}.weight" for b in range(8) for r in ("attn_v", "ffn_up", "ffn_gate")] + ["output.weight"]
    assert groups(names) == ["attn_v", fitting.GATE_UP, "output", "quarter 0", "quarter 1", "quarter 2", "quarter 3"]
    w = offset_weight(lambda n: 3.0, {"attn_v": 1, "quarter 3": -1, "output": 1}, 8)
    assert w("blk.0.attn_v.weight") == 6.0 and w("blk.7.attn_v.weight") == 3.0  # 2 x 1/2 in the last quarter
    assert w("blk.7.ffn_up.weight") == 1.5 and w("blk.2.ffn_gate.weight") == 3.0
    assert w("output.weight") == 6.0
