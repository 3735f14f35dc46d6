"""The .nkat file: stock LoRA layout, nkat.* metadata, INT8 error bounds."""

import dataclasses

import numpy as np
import pytest
from gguf import GGUFReader

from nkat_gguf.errors import UserError
from nkat_gguf.formats.identity import ModelIdentity
from nkat_gguf.formats.nkat_format import NkatMeta, ThetaFactors, read_meta, read_nkat, write_nkat

rng = np.random.default_rng(7)
BASE = ModelIdentity(name="m", architecture="llama", file_size=123, fingerprint="abc", path="/m.gguf")


def meta(theta_type="q8_0", gamma=2.0):
    return NkatMeta(theta_rank=4, theta_gamma=gamma, source="residual", structure="general",
                    theta_type=theta_type, base=BASE)


def test_f32_roundtrip_is_exact_and_layout_is_llama_cpp_lora(tmp_path):
    A = rng.standard_normal((4, 64)).astype(np.float32)
    B = rng.standard_normal((96, 4)).astype(np.float32)
    path = tmp_path / "t.nkat"
    nbytes = write_nkat(path, "llama", [ThetaFactors("blk.0.attn_q.weight", A, B)], meta("f32"))
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == pytest.approx(1.0)  # 0.5 * gamma
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors["blk.0.attn_q.weight.lora_a"].shape) == [64, 4]   # ggml ne: [n_in, r]
    assert list(tensors["blk.0.attn_q.weight.lora_b"].shape) == [4, 96]   # ggml ne: [r, n_out]
    # llama.cpp applies scale * alpha / rank * B_stored A = 0.5 * gamma * B A
    B_stored = np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data).reshape(96, 4)
    np.testing.assert_array_equal(B_stored * (1.0 / 4), B * 1.0)
    back = read_nkat(path)
    np.testing.assert_array_equal(back.factors["blk.0.attn_q.weight"].A, A)
    np.testing.assert_allclose(back.factors["blk.0.attn_q.weight"].B, B, rtol=1e-6)
    assert nbytes == back.theta_bytes == (4 * 64 + 96 * 4) * 4
    assert back.meta.base.fingerprint == "abc" and back.meta.source == "residual"


def test_q8_0_error_within_block_bound_and_f16_fallback_for_odd_rank(tmp_path):
    A = rng.standard_normal((5, 128)).astype(np.float32)  # rows of 128: Q8_0
    B = rng.standard_normal((64, 5)).astype(np.float32)   # rank 5: not a multiple of 32 -> F16
    path = tmp_path / "q.nkat"
    write_nkat(path, "llama", [ThetaFactors("blk.1.ffn_up.weight", A, B)], meta("q8_0"))
    back = read_nkat(path)
    assert back.tensor_types["blk.1.ffn_up.weight"] == ("Q8_0", "F16")
    A_back = back.factors["blk.1.ffn_up.weight"].A
    blocks = np.abs(A).reshape(5, -1, 32).max(axis=2, keepdims=True)
    # half a step, plus up to 127 steps of the fp16 rounding of the block scale (2^-11 relative)
    bound = blocks / 127 * (0.5 + 127 * 2.0**-11) + 1e-7
    err = np.abs(A_back - A).reshape(5, -1, 32)
    assert (err <= bound).all()
    assert err.max() > 0  # it really is quantized


def q8_0_step_bound(X):
    """Per-element bound of Q8_0 rounding error for X (rows in blocks of 32)."""
    blocks = np.abs(X).reshape(X.shape[0], -1, 32).max(axis=2, keepdims=True)
    return np.broadcast_to(blocks / 127 * (0.5 + 127 * 2.0**-11), blocks.shape[:2] + (32,)).reshape(X.shape)


def test_antisymmetric_theta_survives_int8_within_its_bound(tmp_path):
    from helpers import factors

    E = rng.standard_normal((64, 64)).astype(np.float32)
    B, A = factors(E, 16, "antisymmetric")  # stored rank 32: Q8_0 for both halves
    path = tmp_path / "a.nkat"
    write_nkat(path, "llama", [ThetaFactors("blk.0.attn_q.weight", A, B)], meta("q8_0"))
    back = read_nkat(path)
    assert back.tensor_types["blk.0.attn_q.weight"] == ("Q8_0", "Q8_0")
    T = back.factors["blk.0.attn_q.weight"].theta()
    # |T_q - T| <= |B| dA + dB |A_q|, with B stored as rank * B (the rank cancels)
    dA = q8_0_step_bound(A)
    dB = q8_0_step_bound(B * 32) / 32
    bound = np.abs(B) @ dA + dB @ np.abs(back.factors["blk.0.attn_q.weight"].A) + 1e-6
    assert (np.abs(T - B @ A) <= bound).all()
    assert (np.abs(T + T.T) <= bound + bound.T).all()
    assert np.abs(T + T.T).max() > 0  # quantization really happened


def test_gamma_zero_is_refused_and_leaves_no_file(tmp_path):
    path = tmp_path / "z.nkat"
    A, B = np.ones((1, 32), np.float32), np.ones((32, 1), np.float32)
    with pytest.raises(UserError, match="non-zero"):
        write_nkat(path, "llama", [ThetaFactors("blk.0.attn_q.weight", A, B)], meta(gamma=0.0))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_read_meta_rejects_a_model_file(tmp_path):
    from conftest import make_gguf

    model = make_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": np.zeros((32, 32))})
    with pytest.raises(UserError, match="not a LoRA adapter"):
        read_meta(model)


def test_meta_reads_back_as_written_with_empty_and_optional_fields(tmp_path):
    """read_meta returns the NkatMeta write_nkat took: empty strings stay (gguf-py's add_string
    would drop them), no reference stays None, extras come back as strings."""
    A, B = np.ones((2, 32), np.float32), np.ones((32, 2), np.float32)
    base = ModelIdentity(name="", architecture="llama", file_size=0, fingerprint="", path="")
    written = NkatMeta(theta_rank=2, theta_gamma=0.5, source="residual", structure="", theta_type="f32",
                       base=base, extra={"note": "", "budget_bytes": 100})
    path = tmp_path / "e.nkat"
    nbytes = write_nkat(path, "llama", [ThetaFactors("blk.0.attn_q.weight", A, B)], written)
    back = read_meta(path)
    assert back == NkatMeta(theta_rank=2, theta_gamma=0.5, source="residual", structure="", theta_type="f32",
                            base=base, reference=None, imatrix="", extra={"note": "", "budget_bytes": "100"},
                            tensor_count=1, theta_bytes=nbytes, architecture="llama", alpha=0.25)
    keys = set(GGUFReader(path).fields)
    assert {"nkat.structure", "nkat.base.name", "nkat.base.fingerprint", "nkat.note"} <= keys
    assert not any(k.startswith("nkat.reference.") or k == "nkat.imatrix" for k in keys)

    with_reference = dataclasses.replace(written, reference=dataclasses.replace(base, name="ref", file_size=9),
                                         imatrix="i.dat", extra={})
    write_nkat(path, "llama", [ThetaFactors("blk.0.attn_q.weight", A, B)], with_reference)
    back = read_meta(path)
    assert back.reference == with_reference.reference and back.imatrix == "i.dat" and back.extra == {}
    assert back.as_dict()["reference.name"] == "ref" and back.theta_bytes == nbytes
