"""Every user mistake: one line on stderr, exit status 2, no traceback, nothing at the output path."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from gguf import GGUFWriter

from conftest import REPO, make_gguf

rng = np.random.default_rng(3)


def nkat(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_user_error(done, *words):
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [l for l in done.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def tiny(tmp_path):
    """A tiny llama-architecture GGUF with two block matrices."""
    return make_gguf(tmp_path / "tiny.gguf", {
        "blk.0.attn_q.weight": rng.standard_normal((64, 64)),
        "blk.0.ffn_up.weight": rng.standard_normal((96, 64)),
        "blk.0.attn_norm.weight": np.ones((1, 64)),
    })


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    out = tmp_path / "o.nkat"
    assert_user_error(nkat("convert", "--input", bad, "--output", out), "not a GGUF file", "notes.gguf")
    assert not out.exists()


def test_truncated_gguf(tmp_path, reference_model):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(reference_model.read_bytes()[: 40 << 20])
    out = tmp_path / "o.nkat"
    assert_user_error(nkat("convert", "--input", cut, "--source", "weight", "--output", out), "truncated")
    assert not out.exists()


def test_reference_of_another_architecture(tmp_path, tiny):
    other = make_gguf(tmp_path / "other.gguf", {"blk.0.attn_q.weight": np.zeros((64, 64)),
                                                 "blk.0.ffn_up.weight": np.zeros((96, 64))}, arch="gpt2")
    out = tmp_path / "o.nkat"
    assert_user_error(nkat("convert", "--input", tiny, "--reference", other, "--theta-rank", "4", "--output", out),
                      "architecture gpt2")
    assert not out.exists()


def test_reference_with_a_mismatched_shape(tmp_path, tiny):
    other = make_gguf(tmp_path / "other.gguf", {"blk.0.attn_q.weight": np.zeros((64, 64)),
                                                 "blk.0.ffn_up.weight": np.zeros((64, 64))})
    assert_user_error(nkat("convert", "--input", tiny, "--reference", other, "--theta-rank", "4",
                           "--output", tmp_path / "o.nkat"), "blk.0.ffn_up.weight")


def test_unsupported_quant_type(tmp_path):
    model = tmp_path / "int8.gguf"
    writer = GGUFWriter(str(model), "llama")
    writer.add_tensor("blk.0.attn_q.weight", rng.integers(-5, 5, (32, 32), dtype=np.int8))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    assert_user_error(nkat("convert", "--input", model, "--source", "weight", "--theta-rank", "2", "--output", tmp_path / "o.nkat"),
                      "I8", "blk.0.attn_q.weight")


def test_nan_in_a_weight(tmp_path):
    w = rng.standard_normal((64, 64))
    w[3, 5] = np.nan
    model = make_gguf(tmp_path / "nan.gguf", {"blk.0.attn_q.weight": w})
    assert_user_error(nkat("convert", "--input", model, "--source", "weight", "--theta-rank", "2", "--output", tmp_path / "o.nkat"),
                      "NaN", "blk.0.attn_q.weight")


@pytest.mark.parametrize("rank", ["0", "-3", "65"])
def test_rank_out_of_range(tmp_path, tiny, rank):
    out = tmp_path / "o.nkat"
    assert_user_error(nkat("convert", "--input", tiny, "--source", "weight", "--theta-rank", rank, "--output", out), "--theta-rank")
    assert not out.exists()


@pytest.mark.parametrize("gamma", ["nan", "inf", "0"])
def test_gamma_not_finite_or_zero(tmp_path, tiny, gamma):
    assert_user_error(nkat("convert", "--input", tiny, "--source", "weight", "--theta-rank", "2", "--theta-gamma", gamma,
                           "--output", tmp_path / "o.nkat"), "--theta-gamma")


def test_unwritable_output(tmp_path, tiny):
    assert_user_error(nkat("convert", "--input", tiny, "--source", "weight", "--theta-rank", "2", "--output", tmp_path / "no" / "dir" / "o.nkat"),
                      "output directory does not exist")


def test_selective_layers_matching_nothing(tmp_path, tiny):
    assert_user_error(nkat("convert", "--input", tiny, "--source", "weight", "--theta-rank", "2", "--selective-layers", "blk.9.*",
                           "--output", tmp_path / "o.nkat"), "--selective-layers blk.9.* matches no weight")


def test_theta_made_for_another_model_is_refused(reference_model, theta_r8, short_text):
    assert_user_error(nkat("ppl", "--model", reference_model, "--theta", theta_r8, "--text", short_text,
                           "--ctx", "256", "--chunks", "2"), "made for base model")


def test_text_shorter_than_two_chunks(tmp_path, reference_model):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    assert_user_error(nkat("ppl", "--model", reference_model, "--text", short, "--ctx", "256"), "at least two chunks")


def test_ctx_larger_than_the_models_context(reference_model, short_text):
    assert_user_error(nkat("ppl", "--model", reference_model, "--text", short_text, "--ctx", "100000"),
                      "training context")


def test_kill_9_mid_conversion_leaves_nothing_at_the_target(tmp_path, base_model, reference_model):
    out = tmp_path / "killed.nkat"
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
    proc = subprocess.Popen([sys.executable, "-m", "nkat_gguf.cli", "convert", "--input", str(base_model),
                             "--reference", str(reference_model), "--theta-rank", "64", "--output", str(out), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()


def test_a_refused_quantization_names_a_full_disk_only_when_it_is(reference_model, tmp_path, monkeypatch):
    """llama.cpp refuses IQ2_XXS without an imatrix, for real; when the output's disk is full (llama.cpp
    then reports only an iostream error) the one-line error says so. Nothing is left either way."""
    from collections import namedtuple

    from nkat_gguf.errors import UserError
    from nkat_gguf.runtime import quantize

    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    with pytest.raises(UserError) as refused:
        quantize.quantize_model(str(reference_model), str(out), "iq2_xxs")
    assert "could not quantize" in str(refused.value) and "full" not in str(refused.value)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(quantize.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    with pytest.raises(UserError) as full:
        quantize.quantize_model(str(reference_model), str(out), "iq2_xxs")
    assert str(full.value).endswith(f": the disk holding {out.parent} is full (0 MiB free)")
    assert list(out.parent.iterdir()) == []
