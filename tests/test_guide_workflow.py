"""The NKAT-GGUF guide's workflow, typed as written through the root scripts (issue 16).

Every step must exit 0, or exit 2 with one line that says what to do; no step may write a theta
that makes the model worse without saying so; optimal_* files exist only when their final
evaluation beats the baseline. Figures are checked against independent `nkat ppl` runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_gguf

pytestmark = pytest.mark.slow


def script(workdir: Path, eval_text: Path, name: str, *args, timeout=900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"), NKAT_EVAL_TEXT=str(eval_text))
    return subprocess.run([sys.executable, str(REPO / name), *map(str, args)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def exits_0_or_explains(proc: subprocess.CompletedProcess) -> bool:
    """True for exit 0; for exit 2 asserts one line naming what to do; anything else fails."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if proc.returncode == 0:
        return True
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "--" in lines[0] or "pass " in lines[0], lines[0]  # names a flag or a way forward
    return False


def ppl_json(eval_text: Path, *args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
    proc = subprocess.run([sys.executable, "-m", "nkat_gguf.cli", "ppl", "--text", str(eval_text), "--json",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_guides_workflow(tmp_path, reference_model, base_model, eval_text):
    model = tmp_path / "M.gguf"
    model.symlink_to(reference_model)
    base = tmp_path / "q4_0.gguf"
    base.symlink_to(base_model)
    run = lambda name, *args: script(tmp_path, eval_text, name, *args)  # noqa: E731
    small = ["--ctx", "128"]  # the checks' chunks: 2 x 128 tokens keep the test short
    written: dict[Path, str] = {}  # every theta a step wrote -> that step's stderr
    scored: dict[Path, dict] = {}  # a theta's independent `nkat ppl` on the checks' chunks, measured once

    # 1. convert as in the guide (no reference): refused with the two ways forward, nothing written
    proc = run("nkat_gguf_converter.py", "--input", model, "--output", "M.nkat", "--theta-rank", "4",
               "--theta-gamma", "0.97")
    assert not exits_0_or_explains(proc)
    assert "--reference" in proc.stderr and "--source weight" in proc.stderr
    assert not (tmp_path / "M.nkat").exists()

    # 2. the seed's method asked for by name: the quick check runs; harmful -> refused, or kept with warnings
    proc = run("nkat_gguf_converter.py", "--input", model, "--output", "M.nkat", "--theta-rank", "4",
               "--theta-gamma", "0.97", "--source", "weight", *small)
    if exits_0_or_explains(proc):
        assert "10390" in proc.stderr  # the measured effect is cited
        written[tmp_path / "M.nkat"] = proc.stderr
    else:
        assert "makes the model worse" in proc.stderr and not (tmp_path / "M.nkat").exists()
    proc = run("nkat_gguf_converter.py", "--input", model, "--output", "kept.nkat", "--theta-rank", "4",
               "--theta-gamma", "0.97", "--source", "weight", "--keep-harmful", "--selective-layers", "blk.0.*",
               *small, "--json")
    assert exits_0_or_explains(proc)
    assert "10390" in proc.stderr and json.loads(proc.stdout)["warnings"]
    written[tmp_path / "kept.nkat"] = proc.stderr

    # 3. the guide's other converter flags, with a reference (the quantized copy as base)
    proc = run("nkat_gguf_converter.py", "--input", model, "--output", "M.nkat", "--optimize-rank")
    assert not exits_0_or_explains(proc)
    proc = run("nkat_gguf_converter.py", "--input", base, "--reference", model, "--output", "sel.nkat",
               "--theta-rank", "4", "--theta-gamma", "0.97", "--selective-layers",
               "layers.0.feed_forward.w1.weight", "layers.0.attention.wq.weight", *small, "--json")
    if exits_0_or_explains(proc):
        written[tmp_path / "sel.nkat"] = proc.stderr
        assert json.loads(proc.stdout)["tensors"] == 2
    proc = run("nkat_gguf_converter.py", "--input", base, "--reference", model, "--output", "res.nkat",
               "--theta-rank", "16", "--target-size", "256", "--selective-layers",
               "model.layers.*.self_attn.*_proj.weight", *small, "--json")  # Hugging Face names, globbed
    assert exits_0_or_explains(proc), proc.stderr
    assert "--target-size is not needed" in proc.stderr
    check = json.loads(proc.stdout)["check"]
    assert check["chunks"] == 2 and not check["harmful"]
    assert json.loads(proc.stdout)["tensors"] == 4 * 30  # q, k, v, o of SmolLM2's 30 blocks
    written[tmp_path / "res.nkat"] = proc.stderr
    independent = ppl_json(eval_text, "--model", base, "--theta", tmp_path / "res.nkat", "--chunks", "2", *small)
    scored[tmp_path / "res.nkat"] = independent
    assert check["ppl"] == pytest.approx(independent["ppl"], rel=1e-9)
    assert check["ppl_base"] == pytest.approx(independent["ppl_base"], rel=1e-9)

    # 4. the inference engine on a .nkat: its base is found from the metadata
    proc = run("nkat_inference_engine.py", "--model", "res.nkat", "--benchmark", "--seq-len", "512",
               "--iterations", "100", "--repeats", "1")
    assert exits_0_or_explains(proc), proc.stderr
    proc = run("nkat_inference_engine.py", "--model", "res.nkat", "--compare", "--seq-len", "128",
               "--iterations", "16", "--repeats", "1", "--json")
    assert exits_0_or_explains(proc), proc.stderr
    bench = json.loads(proc.stdout)
    for key in ("tokens_per_second", "avg_latency_ms", "device", "theta_enabled", "overhead_percentage",
                "nkat_tokens_per_second", "baseline_tokens_per_second", "perplexity_change"):
        assert bench[key] is not None, key
    assert bench["theta_enabled"] is True
    # measured, not estimated: the same figure as nkat ppl on the same chunks
    assert bench["perplexity_change"] == pytest.approx(independent["ppl"] - independent["ppl_base"], rel=1e-9)
    for extra in (["--theta-gamma", "0.95"], ["--no-cuda"]):
        proc = run("nkat_inference_engine.py", "--model", "res.nkat", *extra, "--seq-len", "64", "--iterations", "8",
                   "--repeats", "1", "--json")
        assert exits_0_or_explains(proc), proc.stderr
        assert json.loads(proc.stdout)["device"] == "cpu"

    # 5. the auto optimizer, as in the guide (no reference) and with one; small trial and chunk counts
    few = ["--mode", "custom", "--trials", "3", "--chunks", "1", "--final-chunks", "2", "--seed", "1", *small]
    proc = run("nkat_auto_optimizer.py", "--model", model, "--output-dir", "D", "--target-rank", "8", *few)
    assert exits_0_or_explains(proc), proc.stderr
    assert "only the weight source is searchable" in proc.stderr
    logs = {"D": proc.stderr}
    proc = run("nkat_auto_optimizer.py", "--model", base, "--reference", model, "--output-dir", "D2",
               "--target-rank", "16", *few)
    assert exits_0_or_explains(proc), proc.stderr
    logs["D2"] = proc.stderr
    for out in (tmp_path / "D", tmp_path / "D2"):
        study = json.loads((out / "optuna_study.json").read_text())
        optimal = sorted(out.glob("optimal_*.nkat"))
        assert (out / "optimization_history.json").is_file()
        confirmed = bool(study["final"] and study["final"]["beats_baseline"])
        assert bool(optimal) == confirmed, study["verdict"]
        if not optimal:
            assert "nothing beat the baseline" in study["verdict"]
            continue
        # the final evaluation's win, measured independently (the base found from the .nkat)
        again = scored[optimal[0]] = ppl_json(eval_text, "--model", optimal[0], "--chunks", "2", *small)
        assert again["tpe"] > again["tpe_base"]
        written[optimal[0]] = logs[out.name]
        # 6. the guide's next step: the optimal theta, compared against its base
        proc = run("nkat_inference_engine.py", "--model", optimal[0], "--compare", "--seq-len", "64",
                   "--iterations", "8", "--repeats", "1")
        assert exits_0_or_explains(proc), proc.stderr
    assert list((tmp_path / "D2").glob("optimal_*.nkat")), "the residual search should find a confirmed win"

    # 7. the backend selector
    proc = run("backend_selector.py", "--json")
    assert exits_0_or_explains(proc), proc.stderr

    # No theta that makes the model worse was written without saying so (each scored by `nkat ppl`
    # on the checks' chunks; a theta already scored above is not scored again).
    for theta, stderr in written.items():
        res = scored.get(theta) or ppl_json(eval_text, "--model", theta, "--chunks", "2", *small)
        if res["ppl"] > res["ppl_base"]:
            assert "worse" in stderr or "10390" in stderr, (theta, stderr)


def test_selective_layers_take_meta_and_hugging_face_names(tmp_path):
    from nkat_gguf.formats.gguf_io import ModelFile

    rng = np.random.default_rng(0)
    names = [f"blk.{b}.{t}.weight" for b in range(3)
             for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    model = ModelFile(make_gguf(tmp_path / "m.gguf", {n: rng.standard_normal((8, 8)) for n in names}))
    pick = model.target_names
    assert pick(["layers.0.feed_forward.w1.weight", "layers.0.attention.wq.weight"]) == [
        "blk.0.attn_q.weight", "blk.0.ffn_gate.weight"]
    assert pick(["layers.2.feed_forward.w2.weight", "layers.1.feed_forward.w3.weight"]) == [
        "blk.1.ffn_up.weight", "blk.2.ffn_down.weight"]
    assert pick(["layers.1.attention.wk.weight", "layers.1.attention.wv.weight", "layers.1.attention.wo.weight"]) == [
        "blk.1.attn_k.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight"]
    assert pick(["model.layers.2.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.q_proj.weight"]) == [
        "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.1.attn_q.weight", "blk.2.attn_output.weight"]
    assert pick(["layers.*.feed_forward.w1.weight"]) == [f"blk.{b}.ffn_gate.weight" for b in range(3)]
    assert pick(["model.layers.*.mlp.up_proj"]) == [f"blk.{b}.ffn_up.weight" for b in range(3)]
    assert pick(["blk.1.attn_*"]) == [f"blk.1.attn_{t}.weight" for t in ("q", "k", "v", "output")]


def test_nkat_as_model_finds_its_base(tmp_path, base_model):
    """Recorded path, then the .nkat's directory, then --models-dir; a wrong fingerprint is refused."""
    from nkat_gguf.errors import UserError
    from nkat_gguf.formats.gguf_io import ModelFile
    from nkat_gguf.formats.nkat_format import NkatMeta, ThetaFactors, find_base_model, split_model_argument, write_nkat

    model = ModelFile(base_model)
    name = "blk.0.attn_q.weight"
    n_out, n_in = model.shape(name)
    factors = [ThetaFactors(name, np.full((2, n_in), 0.01, np.float32), np.full((n_out, 2), 0.01, np.float32))]

    def theta_at(path: Path, recorded: str) -> Path:
        identity = dataclasses.replace(model.identity(), path=recorded)
        write_nkat(path, model.architecture, factors, NkatMeta(2, 2.0, "residual", "general", "f32", identity))
        return path

    recorded = theta_at(tmp_path / "a.nkat", str(base_model))
    assert split_model_argument(recorded, ["x.nkat"]) == (str(base_model), [str(recorded), "x.nkat"])
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "renamed.gguf").symlink_to(base_model)
    beside = theta_at(moved / "b.nkat", str(tmp_path / "gone" / "base.gguf"))
    assert find_base_model(beside) == moved / "renamed.gguf"  # found by fingerprint beside the .nkat
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lost = theta_at(elsewhere / "c.nkat", str(tmp_path / "gone" / "base.gguf"))
    assert find_base_model(lost, models_dir=moved) == moved / "renamed.gguf"
    with pytest.raises(UserError, match="base model not found"):
        find_base_model(lost)
    other = tmp_path / "other.gguf"
    data = bytearray(Path(base_model).read_bytes())
    data[len(data) // 2] ^= 0xFF
    other.write_bytes(bytes(data))
    with pytest.raises(UserError, match="fingerprint"):
        find_base_model(recorded, base=other)
