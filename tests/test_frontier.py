"""nkat frontier / attribute and the byte-matched-control rule, on the embedded SmolLM2 model.

A tiny ladder (Q4_0, Q5_0 of the Q4_1 reference), theta on Q4_0 at two budgets, 2 chunks of 128
tokens. The stored-log-prob scorer is checked against the in-memory one (both models loaded),
restoring every tensor from the reference must give KLD 0, a rerun must come from the cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from nkat_gguf.measure.byte_control import BYTE_TOLERANCE, best_control, byte_matched, charged_tpe
from nkat_gguf.measure.evaluate import LogprobStore, log_softmax, tpe

pytestmark = pytest.mark.slow
CTX, CHUNKS = 128, 2
THREADS = 2  # every run alike (scores are compared across runs); both cores of the 2-core CI machine


def nkat(*args, timeout=1800):
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# -- the rule ------------------------------------------------------------------------------
def test_byte_matched_rule_and_charged_tpe():
    assert byte_matched(100, 100) and byte_matched(int(100 * (1 + BYTE_TOLERANCE)), 100)
    assert not byte_matched(int(100 * (1 + BYTE_TOLERANCE)) + 2, 100)
    assert byte_matched(10, 100)  # something smaller always qualifies
    assert charged_tpe(10.0, 1000, 1000) == pytest.approx(0.1)
    assert charged_tpe(10.0, 1100, 1000) == pytest.approx(tpe(10.0, 100, 1000))
    point = {"label": "p", "bytes": 1000, "ppl": 10.0, "kld_mean": 0.20}
    plain = [{"label": "small", "bytes": 900, "ppl": 11.0, "kld_mean": 0.30},
             {"label": "good", "bytes": 1010, "ppl": 10.5, "kld_mean": 0.15},
             {"label": "big", "bytes": 1200, "ppl": 9.0, "kld_mean": 0.05}]
    c = best_control(point, plain)
    assert c["label"] == "good" and c["metric"] == "kld_mean" and c["beaten"] and not c["beaten_on_ppl"]
    assert best_control({**point, "bytes": 800}, plain) is None
    c = best_control({k: v for k, v in point.items() if k != "kld_mean"}, [{"label": "s", "bytes": 900, "ppl": 9.5}])
    assert c["metric"] == "ppl" and c["beaten"]


def test_logprob_store_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    logp = log_softmax((rng.standard_normal((7, 5000)) * 4).astype(np.float32))
    store = LogprobStore(tmp_path / "s")
    store.save(0, logp, np.arange(7))
    back, targets = store.load(0)
    assert np.array_equal(targets, np.arange(7))
    kept = logp >= logp.max(axis=1, keepdims=True) - 32
    assert np.abs(back - logp)[kept].max() < 1e-3
    p = np.exp(logp)
    assert abs((p * (logp - back)).sum(axis=1)).max() < 1e-3  # KLD error from storage


# -- the command on a tiny ladder ----------------------------------------------------------
@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory, reference_model, short_text, calib_text):
    work = tmp_path_factory.mktemp("frontier")
    args = ["frontier", "--reference", reference_model, "--text", short_text, "--calib-text", calib_text,
            "--calib-chunks", 1, "--work-dir", work, "--ladder", "q4_0,q5_0", "--bases", "q4_0",
            "--budgets", "5%,next", "--theta-rank", 4, "--fit-chunks", 1, "--chunks", CHUNKS, "--ctx", CTX,
            "--threads", THREADS, "--json"]
    done = nkat(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, args, json.loads(done.stdout)


def test_frontier_rows_controls_and_outputs(frontier_run):
    work, _, result = frontier_run
    rows = {r["label"]: r for r in result["rows"]}
    kinds = sorted(r["kind"] for r in result["rows"])
    assert kinds == ["control", "control", "ladder", "ladder", "mix", "mix", "reference", "theta", "theta"]
    for m in (r for r in result["rows"] if r["kind"] == "mix"):  # nkat mix at each rung's bytes
        rung = rows[m["at"]]
        assert m["bytes"] <= rung["bytes"] and m["theta"] is None
        assert m["kld_mean"] < rung["kld_mean"]  # measured here: 0.021 vs 0.163 at Q4_0's bytes, 0 vs 0.044 at Q5_0's
    ref = next(r for r in result["rows"] if r["kind"] == "reference")
    base, upper = rows["Q4_0-imat"], rows["Q5_0-imat"]
    assert ref["kld_mean"] == 0 and base["kld_mean"] > 0 and upper["kld_mean"] < base["kld_mean"]
    for p in (r for r in result["rows"] if r["kind"] == "theta"):
        assert p["theta_bytes"] > 0 and p["model_bytes"] == base["bytes"]
        assert p["kld_mean"] < base["kld_mean"]  # activation-scaled theta moves towards the reference
        control = rows[next(c["label"] for c in result["rows"] if c.get("for") == p["label"])]
        assert control["bytes"] <= p["bytes"]  # the recipe allocator's mix never exceeds the point's bytes
        assert control["kld_mean"] < base["kld_mean"]
        assert p["verdict"].startswith(p["label"]) and p["control"] is not None
        if p["budget"] == "next":
            assert p["bytes"] <= upper["bytes"]
    # the frontier: nothing on it is beaten by a smaller-or-equal model
    for r in result["rows"]:
        if r["pareto_kld"]:
            assert not any(o["bytes"] <= r["bytes"] and o["kld_mean"] < r["kld_mean"] for o in result["rows"])
    out = result["outputs"]
    assert Path(out["png"]).read_bytes()[:4] == b"\x89PNG"
    assert "| model |" in Path(out["markdown"]).read_text()
    assert json.loads(Path(out["json"]).read_text())["verdicts"] == result["verdicts"]


def test_frontier_stored_scores_equal_the_in_memory_scorer(frontier_run, reference_model, short_text):
    """The one-model-at-a-time path (reference log-probs on disk) vs evaluate() with both loaded."""
    from nkat_gguf.measure.ppl import PplRequest, run_ppl
    from nkat_gguf.runtime.settings import RuntimeSettings

    _, _, result = frontier_run
    point = next(r for r in result["rows"] if r["kind"] == "theta")
    direct = run_ppl(PplRequest(models=[point["model"]], thetas=[point["theta"]], text=str(short_text),
                                reference=str(reference_model), chunks=CHUNKS,
                                runtime=RuntimeSettings(ctx=CTX, threads=THREADS), quiet=True))
    row = next(r for r in direct["rows"] if "gamma" in r)
    assert row["ppl"] == pytest.approx(point["ppl"], rel=1e-6)
    assert row["kld_mean"] == pytest.approx(point["kld_mean"], rel=2e-3, abs=2e-4)
    assert row["top1_agreement"] == pytest.approx(point["top1_agreement"], abs=1e-9)


def test_frontier_rerun_comes_from_the_cache(frontier_run):
    work, args, result = frontier_run
    scores = work / "scores.json"
    before = scores.stat().st_mtime_ns
    done = nkat(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads(done.stdout)
    assert scores.stat().st_mtime_ns == before
    assert [(r["label"], r["ppl"], r["kld_mean"]) for r in again["rows"]] == \
        [(r["label"], r["ppl"], r["kld_mean"]) for r in result["rows"]]


@pytest.mark.parametrize("flag,value,word", [("--ladder", "q4_0,q9_k", "q9_k"), ("--budgets", "lots", "lots"),
                                             ("--bases", "q8_0", "q8_0"), ("--no-ladder-imatrix", None, "IQ2_XXS")])
def test_frontier_bad_input_is_one_line(tmp_path, reference_model, short_text, flag, value, word):
    args = {"--ladder": "q4_0", "--bases": "q4_0", "--budgets": "5%"} | {flag: value}
    if value is None:  # a flag alone: the default ladder, whose IQ2 types need an imatrix
        args = {flag: None}
    done = nkat("frontier", "--reference", reference_model, "--text", short_text, "--work-dir", tmp_path / "w",
                *[x for kv in args.items() for x in kv if x is not None], "--quiet")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], done.stderr


# -- attribution ---------------------------------------------------------------------------
def test_attribute_restoring_everything_gives_the_reference(tmp_path, frontier_run, reference_model, short_text):
    work, _, result = frontier_run
    base = next(r for r in result["rows"] if r["label"] == "Q4_0-imat")
    done = nkat("attribute", "--base", base["model"], "--reference", reference_model, "--text", short_text,
                "--work-dir", tmp_path / "a", "--groups", "attn_v,token_embd,blk 0-99", "--chunks", CHUNKS,
                "--ctx", CTX, "--threads", THREADS, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    att = json.loads(done.stdout)
    groups = {g["group"]: g for g in att["groups"]}
    assert att["base"]["kld_mean"] == pytest.approx(base["kld_mean"], rel=1e-6)  # same chunks, same scorer
    assert 0 < groups["attn_v"]["share"] < 1 and groups["attn_v"]["tensors"] == 30
    assert groups["attn_v"]["extra_bytes"] > 0
    # all blocks + token_embd (tied output) from the reference: every weight the reference's
    everything = groups["blk 0-99"]
    assert everything["share"] > groups["attn_v"]["share"]
    assert Path(att["outputs"]["png"]).read_bytes()[:4] == b"\x89PNG"


def test_mixed_file_takes_donor_tensors_verbatim(tmp_path, frontier_run, reference_model):
    from nkat_gguf.formats.assemble import assembled_size, write_mixed
    from nkat_gguf.formats.gguf_io import open_gguf

    work, _, result = frontier_run
    base = next(r for r in result["rows"] if r["label"] == "Q4_0-imat")["model"]
    names = ["blk.0.attn_q.weight", "blk.3.ffn_down.weight"]
    out = tmp_path / "mixed.gguf"
    size = write_mixed(base, {n: str(reference_model) for n in names}, out)
    assert size == assembled_size(base, {n: str(reference_model) for n in names}) == out.stat().st_size
    mixed = {t.name: t for t in open_gguf(out).tensors}
    ref = {t.name: t for t in open_gguf(reference_model).tensors}
    b = {t.name: t for t in open_gguf(base).tensors}
    for name in mixed:
        src = ref[name] if name in names else b[name]
        assert mixed[name].tensor_type == src.tensor_type
        assert np.array_equal(np.asarray(mixed[name].data), np.asarray(src.data))


def test_attribute_skips_a_group_stored_as_in_the_reference(tmp_path, frontier_run, reference_model, short_text):
    """A group whose tensors are byte-identical in base and reference is neither assembled nor scored."""
    from nkat_gguf.formats.assemble import write_mixed
    from nkat_gguf.formats.gguf_io import open_gguf
    from nkat_gguf.measure.attribute import _same_tensor

    _, _, result = frontier_run
    q4_0 = next(r for r in result["rows"] if r["label"] == "Q4_0-imat")["model"]
    names = [t.name for t in open_gguf(q4_0).tensors if t.name.endswith("attn_q.weight")]
    base = tmp_path / "q-restored.gguf"
    write_mixed(q4_0, {n: str(reference_model) for n in names}, base)
    b = {t.name: t for t in open_gguf(base).tensors}
    ref = {t.name: t for t in open_gguf(reference_model).tensors}
    assert _same_tensor(b[names[0]], ref[names[0]]) and not _same_tensor(b["blk.0.attn_v.weight"], ref["blk.0.attn_v.weight"])
    done = nkat("attribute", "--base", base, "--reference", reference_model, "--text", short_text, "--work-dir",
                tmp_path / "a", "--groups", "attn_q,attn_v", "--chunks", 1, "--ctx", CTX, "--threads", THREADS, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    groups = {g["group"]: g for g in json.loads(done.stdout)["groups"]}
    assert groups["attn_q"]["tensors_differing"] == 0 and groups["attn_q"]["share"] == 0
    assert groups["attn_v"]["share"] > 0
    restored = [p.name for p in (tmp_path / "a").glob("restore-*.gguf")]
    assert len(restored) == 1 and restored[0].endswith("attn_v.gguf")
    assert "Stored byte for byte as in the reference (nothing to restore, not scored): attn_q." in \
        (tmp_path / "a" / "attribution.md").read_text()


def test_quantize_overrides_and_imatrix(tmp_path, frontier_run, reference_model, base_model):
    """tt_overrides set the named tensors' type; the imatrix changes the rounding, not the size."""
    from nkat_gguf.formats.gguf_io import open_gguf
    from nkat_gguf.runtime.quantize import quantize_model

    _, _, result = frontier_run
    plain = quantize_model(str(reference_model), str(tmp_path / "plain.gguf"), "q4_0",
                           overrides={r"attn_v\.weight$": "q8_0"})
    types = {t.name: t.tensor_type.name for t in open_gguf(plain["output"]).tensors}
    assert all(types[n] == "Q8_0" for n in types if n.endswith("attn_v.weight"))
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    # the same reference to Q4_0 by quantize_model without an imatrix (the session's base) and with the
    # frontier's imatrix (its Q4_0 rung)
    weighted = next(r for r in result["rows"] if r["label"] == "Q4_0-imat")["model"]
    a = {t.name: t for t in open_gguf(base_model).tensors}
    b = {t.name: t for t in open_gguf(weighted).tensors}
    name = "blk.0.attn_q.weight"
    assert a[name].tensor_type.name == b[name].tensor_type.name == "Q4_0"
    assert a[name].n_bytes == b[name].n_bytes and not np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data))


def test_quantize_bad_override_is_one_line(tmp_path, reference_model):
    done = nkat("quantize", "--input", reference_model, "--output", tmp_path / "x.gguf", "--tensor-type", "attn_v")
    assert done.returncode == 2 and "REGEX=TYPE" in done.stderr and not (tmp_path / "x.gguf").exists()


def test_ppl_rows_use_the_one_rule(tmp_path):
    """nkat ppl's rows (measure.assemble): TPE charged by bytes beyond the base, controls by the rule."""
    from nkat_gguf.measure.ppl import assemble

    files = {}
    for name, size in (("base.gguf", 1000), ("next.gguf", 1050), ("big.gguf", 1200)):
        files[name] = tmp_path / name
        files[name].write_bytes(bytes(size))
    res = {"base.gguf": {"ppl": 12.0, "kld_mean": 0.3}, "+ t.nkat": {"ppl": 11.0, "kld_mean": 0.2},
           "next.gguf": {"ppl": 10.5, "kld_mean": 0.1}, "big.gguf": {"ppl": 10.0, "kld_mean": 0.05}}
    info = {"base.gguf": {"theta_bytes": 0, "model": files["base.gguf"]},
            "+ t.nkat": {"theta_bytes": 40, "gamma": 1.0, "model": files["base.gguf"]},
            "next.gguf": {"theta_bytes": 0, "model": files["next.gguf"]},
            "big.gguf": {"theta_bytes": 0, "model": files["big.gguf"]}}
    out = assemble(res, info, "base.gguf", None, {}, 0.0)
    rows = {r["label"]: r for r in out["rows"]}
    assert rows["next.gguf"]["tpe"] == pytest.approx(charged_tpe(10.5, 1050, 1000))
    assert rows["+ t.nkat"]["tpe"] == pytest.approx(tpe(11.0, 40, 1000))
    control = out["controls"]["+ t.nkat"]
    assert control["label"] == "next.gguf" and control["beaten"]  # 1050 <= 1.02 * 1040; big.gguf is not matched
