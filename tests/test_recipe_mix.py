"""nkat mix on the demo model with real llama.cpp: the written tensor types equal the recipe, the
file's bytes equal the prediction and stay within the budget, the same inputs give the same bytes,
and the cost estimate on sampled rows is close to the full tensor's and exactly what llama.cpp writes."""

from __future__ import annotations

import filecmp
import subprocess
import sys

import numpy as np
import pytest
from gguf.quants import dequantize

from nkat_gguf.formats.gguf_io import open_gguf
from nkat_gguf.recipe.costs import Statistics, input_weights, output_error, tensor_cost
from nkat_gguf.recipe.mix import MixOptions, run_mix
from nkat_gguf.recipe.recipe_file import read_recipe

TYPES = ["IQ2_XXS", "Q2_K", "IQ3_S", "Q3_K", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q6_K", "Q8_0"]


@pytest.fixture(scope="module")
def imatrix(tmp_path_factory, reference_model):
    """A real imatrix of the reference: 2 chunks x 128 tokens of WikiText-2 valid."""
    from nkat_gguf.formats.defaults import find_calibration_text
    from nkat_gguf.formats.imatrix import write_imatrix
    from nkat_gguf.measure.ppl import read_text
    from nkat_gguf.runtime.activation_stats import collect

    stats, facts = collect(str(reference_model), read_text(find_calibration_text()), 2, 128, None, False, True)
    return str(write_imatrix(tmp_path_factory.mktemp("imat") / "ref.imatrix", stats, chunks=facts["chunks"],
                             chunk_size=128))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, reference_model, imatrix):
    out = tmp_path_factory.mktemp("mix")
    opts = MixOptions(reference=str(reference_model), output=str(out / "m.gguf"), work_dir=str(out / "work"),
                      budgets=["68MiB", "4.9bpw"], imatrix=imatrix, rows=32, types=TYPES, quiet=True)
    return opts, run_mix(opts)


def test_written_types_bytes_and_budget(mixed):
    _, result = mixed
    assert len(result["mixes"]) == 2
    for m in result["mixes"]:
        written = {t.name: t.tensor_type.name for t in open_gguf(m["output"]).tensors}
        recipe = read_recipe(m["recipe"])
        assert recipe == {t["name"]: t["type"] for t in m["tensors"]}
        assert all(written[n] == t for n, t in recipe.items())
        assert len(set(recipe.values())) >= 2  # a real mix, not one type
        size = open_gguf(m["output"]).data.size
        assert size == m["file_bytes"] == m["predicted_bytes"] <= m["budget_bytes"]
    small, large = sorted(result["mixes"], key=lambda m: m["budget_bytes"])
    assert small["predicted_damage"] >= large["predicted_damage"]
    for m in result["mixes"]:  # gate and up of a block share one type (the default guardrail)
        recipe = read_recipe(m["recipe"])
        assert all(recipe[n] == recipe[n.replace("ffn_gate", "ffn_up")] for n in recipe if "ffn_gate" in n)


def test_same_inputs_same_bytes(mixed, tmp_path):
    opts, result = mixed
    # everything again in a new work dir (imatrix given, costs recomputed), for the first budget
    again = MixOptions(**{**opts.__dict__, "output": str(tmp_path / "again.gguf"), "work_dir": str(tmp_path / "w"),
                          "budgets": opts.budgets[:1]})
    second = run_mix(again)
    assert len(second["mixes"]) == 1
    assert filecmp.cmp(result["mixes"][0]["model"], second["mixes"][0]["output"], shallow=False)


def test_costs_are_what_llamacpp_writes_and_sampling_is_close(mixed, reference_model, imatrix):
    """For tensors of the mix: the damage of the type llama.cpp wrote, computed by numpy from the
    written file (gguf-py's dequantization), equals the full-tensor cost; the 128-row estimate
    stays within 10 % of it."""
    _, result = mixed
    m = result["mixes"][0]
    ref = {t.name: t for t in open_gguf(reference_model).tensors}
    out = {t.name: t for t in open_gguf(m["output"]).tensors}
    stats = Statistics(imatrix)
    errors = []
    requantized = [n for n in out if n.startswith("blk.") and n.endswith(".weight") and len(out[n].shape) == 2
                   and out[n].tensor_type != ref[n].tensor_type]  # (a Q4_1 tensor of the Q4_1 reference is exact)
    names = [next(n for n in requantized if role in n) for role in ("ffn_down", "attn_q", "ffn_up")]
    for name in names:
        qtype = out[name].tensor_type.name
        full = tensor_cost(ref[name], stats, None, [qtype])
        sampled = tensor_cost(ref[name], stats, 128, [qtype])
        shape = (int(ref[name].shape[1]), int(ref[name].shape[0]))
        w_ref = dequantize(ref[name].data, ref[name].tensor_type).reshape(shape)
        w_out = dequantize(out[name].data, out[name].tensor_type).reshape(shape)
        numpy_damage = output_error(w_ref - w_out, input_weights(name, stats, stats.importance(name)))
        assert full.options[qtype][1] == pytest.approx(numpy_damage, rel=1e-4)
        rel = abs(sampled.options[qtype][1] - full.options[qtype][1]) / full.options[qtype][1]
        errors.append((name, qtype, rel))
        assert rel < 0.10, (name, qtype, rel)
    print("sampled-row estimate error:", errors)


def test_cli_bad_budget_one_line(reference_model, imatrix, tmp_path):
    cmd = [sys.executable, "-m", "nkat_gguf.cli", "mix", "--reference", str(reference_model), "--budget-mb", "1",
           "--imatrix", imatrix, "--types", ",".join(TYPES), "--rows", "8", "--quiet", "-o", str(tmp_path / "x.gguf")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "below the smallest file" in run.stderr
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("extra, words", [
    (["--gptq", "REFERENCE"], "covariance"),                     # a model file is not a covariance file
    (["--gptq", "MISSING"], "file not found"),
    (["--gptq", "REFERENCE", "--theta"], "cannot be combined"),
    (["--gptq-damp", "0.3"], "--gptq-damp needs --gptq"),
    (["--gptq-priced"], "--gptq-priced needs --gptq"),
    (["--refine", "3", "--fit-chunks", "0"], "--refine needs --fit-chunks"),
    (["--fit-check", "--fit-chunks", "0"], "--fit-check needs --fit-chunks"),
    (["--refine", "3", "--theta"], "cannot be combined"),
    (["--refine-storage", "sqlite:///x.db"], "--refine-storage needs --refine"),
    (["--match-speed"], "--match-speed needs a stock file"),
    (["--compare", "Q4_0", "--match-speed", "2"], "outside (0, 1.5]"),
])
def test_cli_bad_gptq_and_refine_settings_one_line(reference_model, imatrix, tmp_path, extra, words):
    """--gptq and --refine mistakes stop before any work: one line, exit 2, nothing written."""
    extra = [str(reference_model) if a == "REFERENCE" else str(tmp_path / "none.cov") if a == "MISSING" else a
             for a in extra]
    cmd = [sys.executable, "-m", "nkat_gguf.cli", "mix", "--reference", str(reference_model), "--bpw", "4.8",
           "--imatrix", imatrix, "--types", ",".join(TYPES), "--rows", "8", "--quiet", "-o", str(tmp_path / "x.gguf"),
           "--work-dir", str(tmp_path / "w"), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and words in run.stderr, run.stderr
    assert not (tmp_path / "x.gguf").exists() and not list((tmp_path / "w").glob("costs-*"))


def test_match_speed_holds_the_mix_to_its_stock_neighbours_predicted_speed(reference_model, imatrix, tmp_path):
    """With --match-speed every option carries its type's time measured in llama.cpp, and the mix at
    Q4_0's bytes is predicted to generate at least as fast as stock Q4_0 (the limit is the stock
    file's own summed time, so the stock recipe itself meets it); at a ratio of 0.8, at least 0.8x."""
    from nkat_gguf.recipe.report import mix_markdown

    opts = MixOptions(reference=str(reference_model), output=str(tmp_path / "m.gguf"), work_dir=str(tmp_path / "w"),
                      budgets=["Q4_0"], imatrix=imatrix, rows=32, types=TYPES, match_speed=1.0, quiet=True)
    for ratio in (1.0, 0.8):
        opts.match_speed = ratio
        result = run_mix(opts)
        (mix,), (stock,) = result["mixes"], result["stock"]
        assert mix["speed_target"] == {"stock": "Q4_0-imat", "ratio": ratio, "met": True}
        assert mix["predicted_tokens_per_second"] >= ratio * stock["predicted_tokens_per_second"] > 0
        speed = result["settings"]["type_speed"]
        assert set(speed["cost_per_weight_vs_q8_0"]) >= {t["type"] for t in mix["tensors"]}
        assert mix["file_bytes"] <= mix["budget_bytes"] == stock["file_bytes"]
        assert f"Held to {ratio:g}x the predicted generation speed of Q4_0-imat: met." in mix_markdown(result)
    assert len(list((tmp_path / "w").glob("type-speed-*.json"))) == 1  # measured once


def test_one_costs_cache_serves_every_type_list(reference_model, imatrix, tmp_path, monkeypatch):
    """A run with more types quantizes only the points the cache lacks, and every point equals a
    fresh computation; a subset comes from the cache without quantizing anything."""
    from nkat_gguf.recipe import costs as costs_mod

    stats = Statistics(imatrix)
    work, fresh_work = tmp_path / "w", tmp_path / "fresh"
    work.mkdir(), fresh_work.mkdir()
    first = costs_mod.model_costs(str(reference_model), stats, work, n_rows=8, types=["Q4_0"], quiet=True)
    quantized = []
    real = costs_mod.ggml_quants.roundtrip
    monkeypatch.setattr(costs_mod.ggml_quants, "roundtrip", lambda t, *a: quantized.append(t) or real(t, *a))
    both = costs_mod.model_costs(str(reference_model), stats, work, n_rows=8, types=["Q4_0", "Q8_0"], quiet=True)
    # (a tensor stored as Q8_0 is not quantized: llama.cpp copies it, its cost is 0)
    assert set(quantized) == {"Q8_0"} and len(quantized) == sum(c.ref_type != "Q8_0" for c in both.values())
    fresh = costs_mod.model_costs(str(reference_model), stats, fresh_work, n_rows=8, types=["Q4_0", "Q8_0"],
                                  quiet=True)
    assert both == fresh
    assert all(list(c.options) == ["Q4_0"] and c.options["Q4_0"] == fresh[n].options["Q4_0"] for n, c in first.items())
    quantized.clear()
    again = costs_mod.model_costs(str(reference_model), stats, work, n_rows=8, types=["Q8_0"], quiet=True)
    assert quantized == [] and all(list(c.options) == ["Q8_0"] for c in again.values())


def test_stored_type_costs_nothing_because_llamacpp_copies_it(mixed, reference_model, imatrix, tmp_path):
    """llama.cpp copies a tensor whose requested type is its stored type: in the written mixes such
    tensors are the reference's bytes. So their cost is 0, from a fresh computation and from a
    cache written before that rule (which held the damage of quantizing them again)."""
    import json

    from nkat_gguf.recipe.costs import model_costs

    _, result = mixed
    ref = {t.name: t for t in open_gguf(reference_model).tensors}
    kept = 0
    for m in result["mixes"]:
        for t in open_gguf(m["output"]).tensors:
            if t.name in read_recipe(m["recipe"]) and t.tensor_type == ref[t.name].tensor_type:
                kept += 1
                assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(ref[t.name].data).view(np.uint8))
    assert kept
    stats = Statistics(imatrix)
    types = ["Q4_1", "Q6_K", "Q8_0"]
    costs = model_costs(str(reference_model), stats, tmp_path, n_rows=8, types=types, quiet=True)
    stored = [c for c in costs.values() if c.ref_type in c.options]
    assert stored and all(c.options[c.ref_type][1] == 0.0 for c in stored)
    assert all(d > 0 for c in stored for t, (_, d) in c.options.items() if t != c.ref_type)
    cache = next(tmp_path.glob("costs-*.json"))
    old = json.loads(cache.read_text())
    for c in old.values():
        if c["ref_type"] in c["options"]:
            c["options"][c["ref_type"]][1] = 1.0
    cache.write_text(json.dumps(old))
    assert model_costs(str(reference_model), stats, tmp_path, n_rows=8, types=types, quiet=True) == costs


def test_fast_preset_has_no_iquants():
    from nkat_gguf.recipe.candidates import CANDIDATE_TYPES, check_types

    fast = check_types(["fast"])
    assert fast and not any(t.startswith("IQ") for t in fast)
    assert set(fast) | {t for t in CANDIDATE_TYPES if t.startswith("IQ")} == set(CANDIDATE_TYPES)
    assert check_types(["all"]) == list(CANDIDATE_TYPES)
    assert check_types(["fast", "iq4_xs"]) == fast + ["IQ4_XS"]
