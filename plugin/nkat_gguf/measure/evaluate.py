"""Perplexity, KL-divergence, top-token agreement (and TPE, from measure/tpe.py), scored as
llama.cpp's perplexity tool.

Per chunk of n_ctx tokens (non-overlapping, from one tokenization of the whole text): clear the
KV cache, put BOS first when the vocab adds one, decode, and score positions
j in [n_ctx/2, n_ctx-2] with -log_softmax(logits_j)[tok_{j+1}]. Logits are requested only for
those positions, and each chunk's distributions are used and dropped (never all in memory).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import BadSetting, Setting, UserError
from ..runtime.chunks import chunk_window
from ..runtime.settings import MIN_CTX
from ..util.report import progress
from .tpe import tpe  # noqa: F401  (the scorer's figures: measure/tpe.py is the formula's home)


def gap_recovered(ppl_base: float, ppl_nkat: float, ppl_reference: float) -> float | None:
    """Share of the base-vs-reference perplexity gap that theta closes (1.0 = all of it);
    None when there is no gap to close."""
    gap = ppl_base - ppl_reference
    return (ppl_base - ppl_nkat) / gap if gap else None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 with float64 sums (vectorized over positions)."""
    m = logits.max(axis=1, keepdims=True)
    shifted = logits - m
    lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return shifted - lse


@dataclass
class Accumulator:
    """Running sums for one model: NLL (PPL), and against a reference KLD and top-1."""

    nll: list = field(default_factory=list)
    kld: list = field(default_factory=list)
    top1: int = 0

    def add(self, logp: np.ndarray, targets: np.ndarray, ref_logp: np.ndarray | None) -> None:
        self.nll.append(-logp[np.arange(len(targets)), targets].astype(np.float64))
        if ref_logp is not None:
            p_ref = np.exp(ref_logp)
            self.kld.append((p_ref * (ref_logp - logp)).sum(axis=1, dtype=np.float64))
            self.top1 += int((ref_logp.argmax(axis=1) == logp.argmax(axis=1)).sum())

    def result(self) -> dict:
        nll = np.concatenate(self.nll)
        count = len(nll)
        mean = float(nll.mean())
        var = float((nll * nll).mean() - mean * mean)
        ppl = math.exp(mean)
        out = {
            "ppl": ppl,
            "ppl_err": ppl * math.sqrt(max(var, 0.0) / (count - 1)) if count > 1 else float("nan"),
            "nll_mean": mean,
            "tokens": count,
        }
        if self.kld:
            kld = np.concatenate(self.kld)
            out.update(
                kld_mean=float(kld.mean()),
                kld_err=float(kld.std() / math.sqrt(count - 1)) if count > 1 else float("nan"),
                kld_p99=float(np.percentile(kld, 99)),
                kld_max=float(kld.max()),
                top1_agreement=self.top1 / count,
            )
        return out


def check_ctx(n_ctx: int) -> None:
    if n_ctx < MIN_CTX:
        raise BadSetting(Setting.CTX, f"must be at least {MIN_CTX} (each chunk scores its second half), not {n_ctx}")


def check_chunks(chunks: int | None) -> None:
    """None means all chunks; anything else must be a positive count."""
    if chunks is not None and chunks < 1:
        raise BadSetting(Setting.CHUNKS, f"must be at least 1 (leave it out for all chunks), not {chunks}")


def chunk_count(n_tokens: int, n_ctx: int, chunks: int | None) -> int:
    check_ctx(n_ctx)
    check_chunks(chunks)
    available = n_tokens // n_ctx
    if available < 2:
        raise BadSetting(f"the text has {n_tokens} tokens: at least two chunks of", Setting.CTX,
                         f"{n_ctx} ({2 * n_ctx} tokens) are needed")
    if chunks is None:
        return available
    return min(chunks, available)


class NonFiniteError(UserError):
    """A model produced NaN/Inf log-probabilities: its figures would be garbage."""


def check_finite(acc: Accumulator, label: str, runtime, chunk: int) -> None:
    """A NaN or Inf log-probability would turn PPL/KLD into garbage: stop and name the source."""
    bad = [what for what, parts in (("log-probabilities", acc.nll), ("KL-divergences", acc.kld))
           if parts and not np.isfinite(parts[-1]).all()]
    if bad:
        theta = getattr(runtime, "theta_path", None)
        source = (f"theta {theta} (gamma {runtime.gamma})" if theta else f"model {runtime.model_path}")
        raise NonFiniteError(f"{label}: non-finite {' and '.join(bad)} in chunk {chunk + 1}: {source} "
                             "produces NaN/Inf logits; no result is reported")


def check_same_vocab(runtimes) -> None:
    first = runtimes[0]
    probe = "The quick brown fox, 1234 — naïve test."
    for other in runtimes[1:]:
        if other.n_vocab != first.n_vocab or not np.array_equal(other.tokenize(probe), first.tokenize(probe)):
            raise UserError(
                f"{other.model_path.name} has another vocabulary than {first.model_path.name}: "
                "KL-divergence needs the same tokenizer"
            )


def chunk_logprobs(runtime, tokens: np.ndarray, n_ctx: int, chunk: int):
    """Decode one chunk; return (log-probs of the scored positions, their target tokens)."""
    start = chunk * n_ctx
    window = chunk_window(runtime, tokens, n_ctx, chunk)
    first = n_ctx // 2
    runtime.clear()
    logits = _decode_all(runtime, window, first)
    targets = tokens[start + first + 1 : start + n_ctx]
    return log_softmax(logits[: n_ctx - 1 - first]), targets


def _decode_all(runtime, window: np.ndarray, first: int) -> np.ndarray:
    """Decode the window in batches of n_batch, keeping logits from position `first` on."""
    parts = []
    for pos in range(0, len(window), runtime.n_batch):
        piece = window[pos : pos + runtime.n_batch]
        logits_from = max(0, first - pos)
        out = runtime.decode(piece, start_pos=pos, logits_from=logits_from if logits_from < len(piece) else None)
        if out is not None:
            parts.append(np.array(out))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class ModelScore:
    """The one scoring routine: one model's figures over the chunks as they come.

    Each chunk is decoded, its log-probs accumulated (against the reference's, when given),
    the decode timed, and a NaN/Inf stops the run with the model named."""

    def __init__(self, runtime, label: str):
        self.runtime, self.label = runtime, label
        self.acc = Accumulator()
        self.seconds = 0.0

    def add(self, tokens: np.ndarray, n_ctx: int, chunk: int, ref_logp: np.ndarray | None = None):
        """Score one chunk; returns (log-probs, target tokens) for a caller that keeps them."""
        t0 = time.perf_counter()
        logp, targets = chunk_logprobs(self.runtime, tokens, n_ctx, chunk)
        self.seconds += time.perf_counter() - t0
        self.acc.add(logp, targets, ref_logp)
        check_finite(self.acc, self.label, self.runtime, chunk)
        return logp, targets

    def result(self, n_chunks: int, n_ctx: int) -> dict:
        speed = n_chunks * n_ctx / self.seconds if self.seconds else float("nan")
        return self.acc.result() | {"chunks": n_chunks, "eval_seconds": self.seconds, "tokens_per_second": speed}


def evaluate(candidates, tokens: np.ndarray, n_ctx: int, chunks: int | None = None,
             reference=None, quiet: bool = False, on_chunk=None) -> dict:
    """Score every candidate runtime (and the reference) on the same chunks in one pass.

    `candidates` maps a label to a Runtime (or to a (Runtime, gamma) pair: the same loaded
    model evaluated at several gammas without reloading). Returns label -> result dict, plus
    "reference" when one is given.
    """
    runtimes = [c[0] if isinstance(c, tuple) else c for c in candidates.values()]
    everything = runtimes + ([reference] if reference is not None else [])
    check_same_vocab(everything)
    n_chunks = chunk_count(len(tokens), n_ctx, chunks)
    scores = {label: ModelScore(c[0] if isinstance(c, tuple) else c, label) for label, c in candidates.items()}
    gammas = {label: c[1] for label, c in candidates.items() if isinstance(c, tuple)}
    ref_score = ModelScore(reference, "the reference") if reference is not None else None
    started = time.perf_counter()
    for chunk in progress(range(n_chunks), desc="perplexity", quiet=quiet, unit="chunk"):
        ref_logp = None  # the last chunk's are dropped before this one is decoded
        if ref_score is not None:
            ref_logp = ref_score.add(tokens, n_ctx, chunk)[0]
        for label, score in scores.items():
            if gammas.get(label) is not None:
                score.runtime.set_gamma(gammas[label])
            score.add(tokens, n_ctx, chunk, ref_logp)
        if on_chunk:
            on_chunk(chunk)
    results = {label: score.result(n_chunks, n_ctx) for label, score in scores.items()}
    if ref_score is not None:
        results["reference"] = ref_score.acc.result() | {"chunks": n_chunks}
    results["_wall_seconds"] = time.perf_counter() - started
    return results


# ----------------------------------------------------------- reference log-probs on disk -------
# One chunk's log-probs at a 151,936-token vocabulary are ~155 MB in float32: a run that scores
# many models against one reference keeps them on disk, as llama-perplexity's --kl-divergence-base
# does, quantized to uint16 per position over [max - LOGP_RANGE, max] (steps of 5e-4 nats).
# Tokens below that range have p < e^-LOGP_RANGE of the top token and add nothing measurable to KLD.
LOGP_RANGE = 32.0
_LEVELS = 65535


class LogprobStore:
    """Per-chunk reference log-probs (uint16 + per-position offset and step) and target tokens."""

    def __init__(self, directory):
        from pathlib import Path

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, chunk: int):
        return self.directory / f"chunk{chunk:04d}.npz"

    def has(self, chunk: int) -> bool:
        return self._path(chunk).is_file()

    def save(self, chunk: int, logp: np.ndarray, targets: np.ndarray) -> None:
        from ..util.atomic import atomic_path

        hi = logp.max(axis=1)
        lo = np.maximum(logp.min(axis=1), hi - LOGP_RANGE)
        step = np.maximum((hi - lo) / _LEVELS, np.float32(1e-12)).astype(np.float32)
        q = np.rint((np.clip(logp, lo[:, None], hi[:, None]) - lo[:, None]) / step[:, None]).astype(np.uint16)
        with atomic_path(self._path(chunk)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, q=q, lo=lo.astype(np.float32), step=step, targets=np.asarray(targets, dtype=np.int32))

    def load(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self._path(chunk)) as z:
            q, lo, step, targets = z["q"], z["lo"], z["step"], z["targets"]
        logp = q.astype(np.float32)
        logp *= step[:, None]
        logp += lo[:, None]
        return logp, targets


def fill_store(runtime, tokens: np.ndarray, n_ctx: int, n_chunks: int, store: LogprobStore,
               quiet: bool = False, desc: str = "reference") -> dict:
    """Decode the reference over the chunks, store its log-probs, return its own PPL figures."""
    score = ModelScore(runtime, "the reference")
    t0 = time.perf_counter()
    for chunk in progress(range(n_chunks), desc=desc, quiet=quiet, unit="chunk"):
        logp, targets = score.add(tokens, n_ctx, chunk)
        if not store.has(chunk):
            store.save(chunk, logp, targets)
        del logp
    return score.acc.result() | {"chunks": n_chunks, "eval_seconds": time.perf_counter() - t0}


def score_model(runtime, tokens: np.ndarray, n_ctx: int, n_chunks: int, store: LogprobStore | None,
                quiet: bool = False, desc: str = "score") -> dict:
    """PPL, and against the stored reference (when `store` is given) KLD and top-1, of one model."""
    score = ModelScore(runtime, desc)
    for chunk in progress(range(n_chunks), desc=desc, quiet=quiet, unit="chunk"):
        ref_logp, targets = store.load(chunk) if store is not None else (None, None)
        logp, own_targets = score.add(tokens, n_ctx, chunk, ref_logp)
        if store is not None and not np.array_equal(own_targets, targets):
            raise UserError(f"{store.directory}: stored reference chunk {chunk} has other tokens than this text")
        del logp, ref_logp
    return score.result(n_chunks, n_ctx)
