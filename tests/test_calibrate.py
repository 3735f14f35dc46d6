"""Activation statistics: the collector against numpy, imatrix files in both formats (and read by
llama.cpp's own GGUF reader), and the `nkat calibrate` command."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.runtime import native
from nkat_gguf.formats.imatrix import (
    LEGACY_CHUNK_SIZE,
    SCALE_FLOOR,
    column_scales,
    read_imatrix,
    write_imatrix,
    write_imatrix_legacy,
)
from nkat_gguf.cli import main
from nkat_gguf.errors import UserError
from nkat_gguf.formats.gguf_io import ModelFile, field_value
from nkat_gguf.runtime.engine import Runtime


def random_stats(rng, n=3) -> dict:
    return {f"blk.{i}.ffn_up.weight": (rng.uniform(0, 50, 64 + i).astype(np.float32), 512 * (i + 1)) for i in range(n)}


# ------------------------------------------------------------------ files ---------------

def test_gguf_imatrix_round_trip(tmp_path):
    stats = random_stats(np.random.default_rng(0))
    path = write_imatrix(tmp_path / "a.imatrix", stats, dataset="valid.txt", chunks=3, architecture="llama")
    back = read_imatrix(path)
    assert back.keys() == stats.keys()
    for name, (sum_sq, count) in stats.items():
        assert np.array_equal(back[name][0], sum_sq) and back[name][1] == count


def test_gguf_imatrix_is_what_llama_cpp_reads(tmp_path):
    """llama.cpp's own gguf reader (libggml-base) opens the file and finds its keys and tensors."""
    import llama_cpp

    stats = random_stats(np.random.default_rng(1))
    path = write_imatrix(tmp_path / "b.imatrix", stats, dataset="valid.txt", chunks=7, chunk_size=256)
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    for fn in ("gguf_get_n_tensors", "gguf_find_tensor", "gguf_find_key"):
        getattr(lib, fn).restype = ctypes.c_int64
    lib.gguf_find_tensor.argtypes = lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_val_u32.restype = ctypes.c_uint32
    lib.gguf_get_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_str.restype = ctypes.c_char_p
    lib.gguf_get_val_str.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert ctx
    try:
        assert lib.gguf_get_n_tensors(ctx) == 2 * len(stats)
        for name in stats:
            assert lib.gguf_find_tensor(ctx, f"{name}.in_sum2".encode()) >= 0
            assert lib.gguf_find_tensor(ctx, f"{name}.counts".encode()) >= 0
        assert lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.type")) == b"imatrix"
        assert lib.gguf_get_val_u32(ctx, lib.gguf_find_key(ctx, b"imatrix.chunk_count")) == 7
        assert lib.gguf_get_val_u32(ctx, lib.gguf_find_key(ctx, b"imatrix.chunk_size")) == 256
        assert lib.gguf_find_key(ctx, b"imatrix.datasets") >= 0
    finally:
        lib.gguf_free(ctx)


def test_legacy_imatrix_round_trip(tmp_path):
    stats = random_stats(np.random.default_rng(2))
    back = read_imatrix(write_imatrix_legacy(tmp_path / "c.dat", stats, dataset="valid.txt", chunks=3))
    for name, (sum_sq, count) in stats.items():
        got_sum, got_count = back[name]
        assert got_count % LEGACY_CHUNK_SIZE == 0
        np.testing.assert_allclose(got_sum / got_count, sum_sq / count, rtol=1e-6)


def test_legacy_reader_follows_llama_cpp_layout(tmp_path):
    """Bytes laid out by hand as llama-imatrix writes them: E[x^2] * ncall per value."""
    mean_sq = np.array([0.5, 2.0, 8.0], dtype="<f4")
    ncall, name = 4, b"blk.0.attn_q.weight"
    raw = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, 3)
    raw += (mean_sq * ncall).tobytes() + struct.pack("<i", 4) + struct.pack("<i", 3) + b"x.t"
    (tmp_path / "d.dat").write_bytes(raw)
    sum_sq, count = read_imatrix(tmp_path / "d.dat")["blk.0.attn_q.weight"]
    assert count == ncall * LEGACY_CHUNK_SIZE
    np.testing.assert_allclose(sum_sq / count, mean_sq, rtol=1e-6)


@pytest.mark.parametrize("content", [b"", b"\x01\x00\x00\x00\x05\x00", b"\xff\xff\xff\xff", b"not an imatrix at all"])
def test_corrupt_imatrix_is_a_user_error(tmp_path, content):
    (tmp_path / "bad.dat").write_bytes(content)
    with pytest.raises(UserError):
        read_imatrix(tmp_path / "bad.dat")


def test_other_gguf_is_not_an_imatrix(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_type("model")
    writer.add_tensor("x", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="not an imatrix"):
        read_imatrix(tmp_path / "m.gguf")
    with pytest.raises(UserError, match="not found"):
        read_imatrix(tmp_path / "missing.imatrix")


def test_nothing_written_without_statistics(tmp_path):
    with pytest.raises(UserError):
        write_imatrix(tmp_path / "e.imatrix", {})
    assert not any(tmp_path.iterdir())


def test_column_scales():
    s = column_scales(np.array([4.0, 16.0, 0.0, 1e-12]) * 10, 10)
    assert s.dtype == np.float32
    np.testing.assert_allclose(s[:2], [2.0, 4.0])
    floor = SCALE_FLOOR * np.median([2.0, 4.0, 1e-6])
    assert s[2] == pytest.approx(floor) and s[3] == pytest.approx(floor)
    assert (column_scales(np.zeros(5), 3) == 1).all()
    with pytest.raises(UserError):
        column_scales(np.ones(3), 0)


# ------------------------------------------------------------------ the collector -------

def first_layer_inputs(model_path: Path, tokens: np.ndarray) -> np.ndarray:
    """numpy: the input of blk.0.attn_q/k/v = RMSNorm(token embeddings) * attn_norm weight."""
    model = ModelFile(model_path)
    embd = model.dequantize("token_embd.weight")[tokens].astype(np.float64)
    norm = np.asarray(model.tensors["blk.0.attn_norm.weight"].data, dtype=np.float64).reshape(-1)
    eps = float(field_value(model.reader, f"{model.architecture}.attention.layer_norm_rms_epsilon"))
    return embd / np.sqrt((embd ** 2).mean(axis=1, keepdims=True) + eps) * norm


@pytest.mark.slow
def test_collector_matches_numpy(base_model, calib_text):
    targets = {"blk.0.attn_q.weight": 576, "blk.0.attn_k.weight": 576, "blk.0.ffn_down.weight": 1536}
    collector = native.ActivationCollector(targets)
    with Runtime(base_model, n_ctx=128, n_threads=2, eval_callback=collector) as rt:
        tokens = rt.tokenize(calib_text.read_bytes()[:20_000])[:96]
        rt.clear()
        rt.decode(tokens, 0, logits_from=0)
        assert collector.check()["applied"] == 3
    results = collector.results()
    collector.close()
    x = first_layer_inputs(base_model, tokens)
    want = (x ** 2).sum(axis=0)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        sum_sq, count = results[name]
        assert count == len(tokens)
        np.testing.assert_allclose(sum_sq, want, rtol=2e-4, atol=1e-6 * want.max())
    assert results["blk.0.ffn_down.weight"][1] == len(tokens)
    assert results["blk.0.ffn_down.weight"][0].shape == (1536,)


# ------------------------------------------------------------------ the command ---------

@pytest.mark.slow
def test_calibrate_command_writes_both_formats(base_model, calib_text, tmp_path, capsys):
    out = tmp_path / "m.imatrix"
    rc = main(["calibrate", "--model", str(base_model), "--text", str(calib_text), "--chunks", "2", "--ctx", "64",
               "--output", str(out), "--json", "--threads", "2"])
    assert rc == 0 and '"tensors": 210' in capsys.readouterr().out
    stats = read_imatrix(out)
    assert len(stats) == 210 and {c for _, c in stats.values()} == {128}
    assert all(np.isfinite(s).all() and (s > 0).any() for s, _ in stats.values())

    dat = tmp_path / "m.dat"
    assert main(["calibrate", "--model", str(base_model), "--text", str(calib_text), "--chunks", "2", "--ctx", "64",
                 "--output", str(dat), "--format", "dat", "--quiet", "--threads", "2"]) == 0
    legacy = read_imatrix(dat)
    for name, (sum_sq, count) in stats.items():
        np.testing.assert_allclose(legacy[name][0] / legacy[name][1], sum_sq / count, rtol=1e-5)


def test_calibrate_refuses_the_evaluation_text(eval_text, tmp_path, capsys):
    out = tmp_path / "x.imatrix"
    assert main(["calibrate", "--text", str(eval_text), "--output", str(out)]) == 2
    assert "evaluation text" in capsys.readouterr().err
    assert not out.exists()
