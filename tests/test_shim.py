"""The native shim inside real llama.cpp: agreement with the lora backend, gamma 0 bit-identity,
gamma changes without reload, and refusal of factors that do not fit the model."""

from __future__ import annotations

import numpy as np
import pytest

from nkat_gguf.runtime import native
from nkat_gguf.errors import UserError
from nkat_gguf.measure.evaluate import log_softmax
from nkat_gguf.formats.nkat_format import ThetaFactors, read_nkat
from nkat_gguf.runtime.engine import Runtime
from helpers import chunk_windows

pytestmark = pytest.mark.slow
CTX = 256
CHUNKS = 3
N_TARGETS = 210  # SmolLM2-135M: 30 blocks x 7 matrices


@pytest.fixture(scope="module")
def windows(base_model, short_text):
    return chunk_windows(base_model, short_text, CTX, CHUNKS)


def chunk_logits(rt, windows) -> list[np.ndarray]:
    out = []
    for w in windows:
        rt.clear()
        out.append(np.array(rt.decode(w, 0, logits_from=CTX // 2)))
    return out


def nll(logits, windows) -> np.ndarray:
    """Per-position negative log-likelihood of the next token, every chunk's scored half."""
    out = []
    for lg, w in zip(logits, windows):
        lp = log_softmax(lg[:-1].astype(np.float64))
        out.append(-lp[np.arange(len(lp)), w[CTX // 2 + 1:]])
    return np.concatenate(out)


def ppl(logits, windows) -> float:
    return float(np.exp(np.mean(nll(logits, windows))))


def kld(p_logits, q_logits) -> float:
    vals = []
    for a, b in zip(p_logits, q_logits):
        lp, lq = log_softmax(a.astype(np.float64)), log_softmax(b.astype(np.float64))
        vals.append((np.exp(lp) * (lp - lq)).sum(axis=1))
    return float(np.mean(np.concatenate(vals)))


@pytest.fixture(scope="module")
def base_logits(base_model, windows):
    with Runtime(base_model, n_ctx=CTX, n_threads=2) as rt:
        return chunk_logits(rt, windows)


@pytest.fixture(scope="module")
def lora_logits(base_model, theta_r8, windows):
    with Runtime(base_model, theta_r8, backend="lora", n_ctx=CTX, n_threads=2) as rt:
        return chunk_logits(rt, windows)


def test_shim_gamma_zero_is_bit_identical_to_base(base_model, theta_r8, windows, base_logits):
    with Runtime(base_model, theta_r8, backend="shim", gamma=0.0, n_ctx=CTX, n_threads=2) as rt:
        got = chunk_logits(rt, windows[:1])  # an identity: one window shows it
        assert rt._hook.stats()["applied"] == 0
    assert len(got) == 1 and np.array_equal(got[0], base_logits[0])


def test_shim_agrees_with_lora(base_model, theta_r8, windows, base_logits, lora_logits):
    with Runtime(base_model, theta_r8, backend="shim", n_ctx=CTX, n_threads=2) as rt:
        shim = chunk_logits(rt, windows)
        stats = rt._hook.stats()
    assert stats["skipped"] == 0 and stats["applied"] == CHUNKS * N_TARGETS
    p_base, p_lora, p_shim = ppl(base_logits, windows), ppl(lora_logits, windows), ppl(shim, windows)
    assert p_lora != p_base  # theta does something
    # Mean NLL over these 381 positions: the two backends round differently (INT8 factors vs
    # llama.cpp's Q8 activations), which moves it by a standard error of ~0.005 (0.5 % PPL; see
    # test_backend_agreement.py for the comparison with merged weights). A systematic
    # difference shows as more than 4 standard errors.
    diff = nll(shim, windows) - nll(lora_logits, windows)
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(len(diff)), (p_base, p_lora, p_shim)
    # the two backends differ by far less than theta's own effect
    effect, disagreement = kld(lora_logits, base_logits), kld(lora_logits, shim)
    assert disagreement < 0.25 * effect, (effect, disagreement)
    top1 = np.mean(np.concatenate([a.argmax(1) == b.argmax(1) for a, b in zip(lora_logits, shim)]))
    assert top1 > 0.9


def test_gamma_changes_without_reload(base_model, theta_r8, windows, base_logits):
    one, base_one = windows[:1], base_logits[:1]  # identities: one window shows them
    with Runtime(base_model, theta_r8, backend="shim", gamma=0.5, n_ctx=CTX, n_threads=2) as rt:
        rt.set_gamma(3.0)
        at3 = chunk_logits(rt, one)
        rt.set_gamma(0.0)
        assert all(np.array_equal(a, b) for a, b in zip(chunk_logits(rt, one), base_one))
        rt._hook.set_gamma(3.0)
        rt._hook.disable()
        assert all(np.array_equal(a, b) for a, b in zip(chunk_logits(rt, one), base_one))
        rt._hook.enable()
        again = chunk_logits(rt, one)
    with Runtime(base_model, theta_r8, backend="shim", gamma=3.0, n_ctx=CTX, n_threads=2) as fresh:
        want = chunk_logits(fresh, one)
    assert len(at3) == len(again) == len(want) == 1
    for a, b, c in zip(at3, again, want):
        assert np.array_equal(a, c) and np.array_equal(b, c)


@pytest.mark.parametrize("wrong", ["n_out", "n_in"])
def test_wrong_shape_is_refused_without_touching_memory(base_model, windows, base_logits, wrong):
    """A theta registered for blk.0.attn_q.weight (576 x 576) with another shape is skipped at run
    time, reported after the decode, and leaves the output exactly as llama.cpp computed it."""
    rng = np.random.default_rng(0)
    n_out, n_in = (100, 576) if wrong == "n_out" else (576, 640)
    bad = {"blk.0.attn_q.weight": ThetaFactors("blk.0.attn_q.weight", rng.standard_normal((4, n_in)).astype(np.float32),
                                               rng.standard_normal((n_out, 4)).astype(np.float32))}
    hook = native.ShimHook(bad, gamma=50.0)
    with Runtime(base_model, n_ctx=CTX, n_threads=2, eval_callback=hook) as rt:
        w = windows[0]
        rt.clear()
        got = np.array(rt.decode(w, 0, logits_from=CTX // 2))
        with pytest.raises(UserError, match="shape"):
            hook.check()
        assert np.array_equal(got, base_logits[0])
        assert hook.stats()["reasons"] == {"shape": 1}
        hook.check()  # the counters were reset: nothing new to report
    hook.close()


def test_hook_skips_registered_names_it_never_sees(base_model, windows, base_logits):
    """A name the model lacks is never claimed: no split, no error, identical logits."""
    rng = np.random.default_rng(1)
    ghost = {"blk.99.attn_q.weight": ThetaFactors("blk.99.attn_q.weight", rng.standard_normal((2, 8)).astype(np.float32),
                                                  rng.standard_normal((8, 2)).astype(np.float32))}
    hook = native.ShimHook(ghost, gamma=1.0)
    with Runtime(base_model, n_ctx=CTX, n_threads=2, eval_callback=hook) as rt:
        rt.clear()
        got = np.array(rt.decode(windows[0], 0, logits_from=CTX // 2))
        assert hook.check()["applied"] == 0
    assert np.array_equal(got, base_logits[0])
    hook.close()


def test_registry_refuses_bad_entries(theta_r8):
    nkat = read_nkat(theta_r8)
    name, f = next(iter(nkat.factors.items()))
    hook = native.ShimHook({name: f}, gamma=1.0)
    with pytest.raises(UserError, match="registered twice"):
        hook._add(native.quantize_factors(f.A, f.B, name))
    hook.close()
    bad_name = {"CUDA0#x#0": ThetaFactors("CUDA0#x#0", f.A, f.B)}
    with pytest.raises(UserError, match="not a valid weight name"):
        native.ShimHook(bad_name, gamma=1.0)
    with pytest.raises(UserError, match="gamma"):
        native.ShimHook({name: f}, gamma=float("nan"))
    with pytest.raises(RuntimeError, match="closed"):
        hook.set_gamma(1.0)


def test_hook_exposes_llama_cpp_callback(theta_r8):
    import ctypes

    import llama_cpp

    hook = native.ShimHook(read_nkat(theta_r8))
    assert isinstance(hook.cb_eval, llama_cpp.ggml_backend_sched_eval_callback)
    assert isinstance(hook.user_data, ctypes.c_void_p) and hook.user_data.value
    assert len(hook.names()) == N_TARGETS
    assert hook.gamma == pytest.approx(read_nkat(theta_r8).gamma)
    # llama.cpp's context parameters take the pair as they are (what Runtime passes it)
    params = llama_cpp.llama_context_default_params()
    params.cb_eval = hook.cb_eval
    params.cb_eval_user_data = hook.user_data
    address = ctypes.cast(hook.cb_eval, ctypes.c_void_p).value
    assert address and ctypes.cast(params.cb_eval, ctypes.c_void_p).value == address
    assert params.cb_eval_user_data == hook.user_data.value
    hook.close()
