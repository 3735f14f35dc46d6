"""ggml's quantizers reached row by row (runtime/ggml_quants) against independent computations:
the bytes llama.cpp's own quantizer writes into a model file, and gguf-py's numpy dequantizers."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize

from nkat_gguf.errors import UserError
from nkat_gguf.formats.gguf_io import open_gguf
from nkat_gguf.formats.imatrix import write_imatrix
from nkat_gguf.runtime import ggml_quants as gq

TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
         "IQ3_S", "IQ4_XS", "IQ4_NL", "IQ1_S", "IQ1_M", "F16"]


def _tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def test_sampled_rows_quantize_to_the_bytes_llama_cpp_writes(tmp_path, reference_model):
    """Three tensors of the embedded model, re-quantized by llama_model_quantize with an imatrix and
    per-tensor types, and the same rows (every 7th) through quantize_rows: byte for byte equal."""
    from nkat_gguf.runtime.quantize import quantize_model

    ref = open_gguf(reference_model)
    picks = {"blk.3.ffn_down.weight": "q4_k", "blk.5.ffn_down.weight": "iq3_s", "blk.3.attn_v.weight": "q5_0"}
    rng = np.random.default_rng(0)
    stats = {}
    for name in picks:
        n_in = int(_tensor(ref, name).shape[0])
        stats[name] = (rng.uniform(0.1, 4.0, n_in).astype(np.float32) * 10, 10)
    imatrix = write_imatrix(tmp_path / "synthetic.imatrix", stats)
    out = tmp_path / "mixed.gguf"
    quantize_model(str(reference_model), str(out), "q8_0", imatrix=str(imatrix),
                   overrides={name.replace(".", r"\."): t for name, t in picks.items()})
    written = open_gguf(out)
    for name, qtype in picks.items():
        src, dst = _tensor(ref, name), _tensor(written, name)
        assert dst.tensor_type.name == qtype.upper()
        n_in = int(src.shape[0])
        rows = gq.dequantize_rows(src.tensor_type, np.asarray(src.data), n_in)[::7]
        importance = stats[name][0] / stats[name][1]
        mine = gq.quantize_rows(qtype, rows, importance)
        theirs = np.asarray(dst.data).reshape(-1, gq.row_bytes(qtype, n_in))[::7]
        assert np.array_equal(mine, theirs), name


@pytest.mark.parametrize("qtype", TYPES)
def test_ggml_dequantization_equals_gguf_py(qtype):
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((9, 512)).astype(np.float32) * rng.uniform(0.01, 2.0, (9, 1)).astype(np.float32)
    importance = rng.uniform(0.05, 3.0, 512).astype(np.float32)
    data = gq.quantize_rows(qtype, rows, importance, threads=2)
    assert data.shape == (9, gq.row_bytes(qtype, 512))
    ours = gq.dequantize_rows(qtype, data, 512)
    numpy_side = dequantize(data, gq.ggml_type(qtype)).reshape(9, 512)
    assert np.array_equal(ours, numpy_side.astype(np.float32))
    # and the round trip is a quantization of the rows, not noise
    err = np.mean((ours - rows) ** 2) / np.mean(rows ** 2)
    assert err < 0.5, err


@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K", "IQ3_S", "IQ2_XS"])
def test_k_and_i_quant_blocks_are_independent_along_a_row(qtype):
    """A slice of whole 256-blocks quantizes to the same bytes as those blocks of the full row."""
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((70, 1024)).astype(np.float32)
    importance = rng.uniform(0.05, 3.0, 1024).astype(np.float32)
    whole = gq.quantize_rows(qtype, rows, importance)
    per_block = gq.row_bytes(qtype, 256)
    for b in range(4):
        part = gq.quantize_rows(qtype, rows[:, b * 256:(b + 1) * 256], importance[b * 256:(b + 1) * 256])
        assert np.array_equal(part, whole[:, b * per_block:(b + 1) * per_block])


def test_threads_do_not_change_the_bytes():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((300, 256)).astype(np.float32)
    assert np.array_equal(gq.quantize_rows("Q3_K", rows, threads=1), gq.quantize_rows("Q3_K", rows, threads=2))


def test_wrong_rows_and_missing_importance_are_refused():
    rows = np.ones((2, 300), dtype=np.float32)
    with pytest.raises(UserError, match="multiple of 256"):
        gq.quantize_rows("Q4_K", rows)
    assert gq.requires_importance("IQ2_XXS") and not gq.requires_importance("Q4_K")
    with pytest.raises(UserError, match="importance"):
        gq.quantize_rows("IQ2_XXS", np.ones((2, 256), dtype=np.float32))
    with pytest.raises(UserError, match="unknown GGML type"):
        gq.ggml_type("Q9_Z")
    assert gq.block_size("Q4_0") == 32 and gq.block_size("IQ3_S") == 256 and gq.row_bytes("Q8_0", 64) == 68
