"""Both run-time backends against an independent reference: the model with theta merged into
its weights (F16, written by nkat_gguf.formats.merge), scored on the same positions.

Noise: the base is Q4_0, whose matmuls quantize activations to Q8; the merged reference has
exact (F16) weights and no such step. That noise is measured here on the same positions as
KLD(base Q4_0 -> its own dequantized F16 copy), and each backend must sit within a small multiple
of it, and far below theta's own effect (KLD from the base to the merged model).

Cases: rank 8 (lora_b stored F16, 8 is not a multiple of 32) and rank 32 (Q8_0); lora and shim;
the shim on every kernel ISA this CPU runs (avx512 skipped where absent); prompt batches and
generation (one token per decode after a prompt).
"""

from __future__ import annotations

import numpy as np
import pytest

from nkat_gguf.runtime import native
from nkat_gguf.measure.evaluate import log_softmax
from nkat_gguf.formats.gguf_io import ModelFile
from nkat_gguf.formats.merge import write_merged
from nkat_gguf.formats.nkat_format import read_nkat
from nkat_gguf.runtime.engine import Runtime
from helpers import chunk_windows

pytestmark = pytest.mark.slow
CTX = 256
CHUNKS = 2
PROMPT = 96          # generation cases: a prompt of this many tokens, then one token per decode
GENERATED = 32
NOISE_FACTOR = 2.0   # a backend may differ from the merge by this multiple of the Q8 noise
EFFECT_SHARE = 0.2   # ... and by at most this share of theta's own effect


@pytest.fixture(scope="module")
def thetas(theta_r8, theta_r32):
    """rank -> .nkat: the session's rank 8 (F16 lora_b) and rank 32 (Q8_0 throughout)."""
    types = {rank: set(read_nkat(path).tensor_types.values()) for rank, path in ((8, theta_r8), (32, theta_r32))}
    assert types[8] == {("Q8_0", "F16")} and types[32] == {("Q8_0", "Q8_0")}, types
    return {8: theta_r8, 32: theta_r32}


@pytest.fixture(scope="module")
def windows(base_model, short_text):
    return chunk_windows(base_model, short_text, CTX, CHUNKS)


def prompt_logprobs(rt, windows) -> list[np.ndarray]:
    """Log-probs of positions CTX/2 .. CTX-1 of every window, one decode per window."""
    out = []
    for w in windows:
        rt.clear()
        out.append(log_softmax(np.array(rt.decode(w, 0, logits_from=CTX // 2))))
    return out


def generation_logprobs(rt, windows) -> list[np.ndarray]:
    """Log-probs of positions PROMPT-1 .. PROMPT+GENERATED-2: the prompt's last one, then one
    decode of a single token per position (batch 1, as in generation)."""
    out = []
    for w in windows:
        rt.clear()
        rows = [np.array(rt.decode(w[:PROMPT], 0, logits_from=PROMPT - 1))[0]]
        for pos in range(PROMPT, PROMPT + GENERATED - 1):
            rows.append(np.array(rt.decode(w[pos:pos + 1], pos, logits_from=0))[0])
        out.append(log_softmax(np.stack(rows)))
    return out


def kld(p_ref: list[np.ndarray], q: list[np.ndarray]) -> float:
    """Mean KL(p_ref || q) over every position."""
    vals = [(np.exp(a) * (a - b)).sum(axis=1, dtype=np.float64) for a, b in zip(p_ref, q)]
    return float(np.mean(np.concatenate(vals)))


def ppl(logprobs: list[np.ndarray], targets: list[np.ndarray]) -> float:
    nll = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in zip(logprobs, targets)])
    return float(np.exp(nll.astype(np.float64).mean()))


@pytest.fixture(scope="module")
def reference(work, base_model, thetas, windows):
    """Log-probs of the base, its dequantized copy and each merged model, prompt and generation."""
    def score(path):
        # the generation positions come from one long prompt decode up to PROMPT+GENERATED
        with Runtime(path, n_ctx=CTX, n_threads=2) as rt:
            prompt = prompt_logprobs(rt, windows)
            gen = []
            for w in windows:
                rt.clear()
                n = PROMPT + GENERATED - 1
                gen.append(log_softmax(np.array(rt.decode(w[:n], 0, logits_from=PROMPT - 1))))
        return {"prompt": prompt, "generation": gen}

    out = {"base": score(base_model)}
    dequant = work / "agreement-dequant-f16.gguf"
    write_merged(base_model, dequant, dtype="f16")
    out["dequant"] = score(dequant)
    dequant.unlink()
    for rank, theta in thetas.items():
        merged = work / f"agreement-merged-r{rank}-f16.gguf"
        info = write_merged(base_model, merged, theta, dtype="f16")
        assert info["merged"] == 210
        out[rank] = score(merged)
        merged.unlink()
    return out


def check_against_merge(got, reference, rank, mode, what):
    ref, base = reference[rank][mode], reference["base"][mode]
    # the Q8 activation noise of the Q4_0 path, on the prompt positions (the most of them)
    noise = kld(reference["dequant"]["prompt"], reference["base"]["prompt"])
    effect = kld(ref, base)             # what theta changes
    off = kld(ref, got)
    assert effect > 5 * noise, (what, effect, noise)  # the comparison can see theta at all
    assert off < NOISE_FACTOR * noise, f"{what}: KLD to the merge {off:.5f}, noise {noise:.5f}, effect {effect:.5f}"
    assert off < EFFECT_SHARE * effect, f"{what}: KLD to the merge {off:.5f}, effect {effect:.5f}"
    top1 = np.mean(np.concatenate([a.argmax(1) == b.argmax(1) for a, b in zip(ref, got)]))
    assert top1 > 0.9, (what, top1)


MODES = {"prompt": prompt_logprobs, "generation": generation_logprobs}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("rank", [8, 32])
def test_lora_matches_merged_weights(base_model, thetas, windows, reference, rank, mode):
    with Runtime(base_model, thetas[rank], backend="lora", n_ctx=CTX, n_threads=2) as rt:
        got = MODES[mode](rt, windows)
    check_against_merge(got, reference, rank, mode, f"lora rank {rank} {mode}")


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("rank", [8, 32])
def test_shim_matches_merged_weights(base_model, thetas, windows, reference, rank, mode, isa):
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU has no {isa} (best: {native.best_isa()})")
    with native.use_isa(isa), Runtime(base_model, thetas[rank], backend="shim", n_ctx=CTX, n_threads=2) as rt:
        got = MODES[mode](rt, windows)
        stats = rt._hook.stats()
    assert stats["skipped"] == 0 and stats["applied"] > 0
    check_against_merge(got, reference, rank, mode, f"shim rank {rank} {mode} {isa}")


def test_merged_weights_are_base_plus_half_gamma_theta(work, base_model, theta_r8):
    """The reference itself, checked tensor by tensor with gguf-py and numpy."""
    out = work / "merge-check-f32.gguf"
    info = write_merged(base_model, out, theta_r8, gamma=3.0, dtype="f32")
    base, merged, nkat = ModelFile(base_model), ModelFile(out), read_nkat(theta_r8)
    assert info["merged"] == len(nkat.factors) == 210
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight", "blk.7.attn_v.weight"):
        f = nkat.factors[name]
        want = base.dequantize(name).astype(np.float64) + 1.5 * (f.B.astype(np.float64) @ f.A.astype(np.float64))
        assert merged.qtype(name) == "F32"
        np.testing.assert_allclose(merged.dequantize(name), want, rtol=0, atol=1e-5)
    for name in ("token_embd.weight", "blk.0.attn_norm.weight"):
        assert merged.qtype(name) == base.qtype(name)
        assert np.array_equal(merged.tensors[name].data, base.tensors[name].data)
    assert {k: f.contents() for k, f in merged.reader.fields.items() if not k.startswith("GGUF.")} == \
           {k: f.contents() for k, f in base.reader.fields.items() if not k.startswith("GGUF.")}
    out.unlink()
