"""Scoring rows against one reference, shared by the frontier, attribution and `nkat mix`.

The reference is decoded once and its log-probs kept on disk; every model is then scored one at a
time against them, and each result is cached by the fingerprints of the files and the settings
(scores.json in the work directory), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..formats.gguf_io import fingerprint_file
from ..runtime.settings import RuntimeSettings
from ..util.atomic import write_text_atomic
from ..util.enums import StrEnum
from ..util.report import say, to_json


class RowKind(StrEnum):
    """What a scored row is; the JSON spells each as its value."""
    REFERENCE = "reference"
    LADDER = "ladder"        # a stock llama.cpp type in the frontier's ladder
    THETA = "theta"          # a base + theta point
    CONTROL = "control"      # the byte-matched mix beside a theta point
    BASE = "base"            # attribution's base
    RESTORED = "restored"    # attribution: one group restored from the reference
    MIX = "mix"              # nkat mix's file for a budget
    STOCK = "stock"          # a stock type scored beside the mixes
    PROBE = "probe"          # nkat mix's probe file for the fit


@dataclass
class ScoredRow:
    """One model (with its theta, if any) to be scored against the reference: what its maker knows
    of it (`facts`: type, base, budget, ... as the JSON reports them), and once scored the
    evaluator's figures (PPL, KLD, top-1, ...)."""

    label: str
    kind: RowKind
    model: str
    theta: str | None = None
    facts: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # empty until scored

    @property
    def ppl(self) -> float:
        return self.figures["ppl"]

    @property
    def kld_mean(self) -> float | None:
        return self.figures.get("kld_mean")

    @property
    def model_bytes(self) -> int:
        return Path(self.model).stat().st_size

    @property
    def theta_bytes(self) -> int:
        return Path(self.theta).stat().st_size if self.theta else 0

    @property
    def bytes(self) -> int:
        """What a user stores: the model file and its theta."""
        return self.model_bytes + self.theta_bytes

    def to_dict(self) -> dict:
        """The row as the JSON reports it: label, kind, the facts, model, theta, then the figures."""
        return {"label": self.label, "kind": self.kind, **self.facts, "model": self.model, "theta": self.theta,
                **self.figures}


def settings_record(opts) -> dict:
    """An options dataclass as one flat dict for the JSON output, its runtime settings beside the rest."""
    return {k: v for k, v in asdict(opts).items() if k != "runtime"} | asdict(opts.runtime)


def file_key(path) -> str:
    return fingerprint_file(path) if path else "-"


def text_key(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class ScoreCache:
    """Results keyed by (model, theta, settings) fingerprints, saved after every model.

    A file that is not such a mapping (truncated, edited, another file) is checked when opened,
    set aside as NAME.damaged with a one-line notice, and its scores are measured again."""

    def __init__(self, path: Path):
        self.path = path
        self.data = self._load()

    def _load(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            data = None
        if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            return data
        aside = self.path.with_name(self.path.name + ".damaged")
        os.replace(self.path, aside)
        print(f"note: {self.path} is damaged (not a JSON mapping of scores): set aside as {aside.name}; "
              "its scores are measured again", file=sys.stderr)
        return {}

    @staticmethod
    def key(parts: dict) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        write_text_atomic(self.path, to_json(self.data))


def pareto(rows: list[ScoredRow], metric: str) -> set[str]:
    """Labels of the rows no other row beats on both bytes (<=) and `metric` (<, lower is better)."""
    best = float("inf")
    front = set()
    for r in sorted(rows, key=lambda r: (r.bytes, r.figures[metric])):
        if r.figures[metric] < best:
            front.add(r.label)
            best = r.figures[metric]
    return front


class Scorer:
    """Models scored one at a time against one reference on one text.

    Opening it tokenizes the text and decodes the reference once (its log-probs kept on disk);
    score(row) then loads, scores and closes one model. Results are cached per file fingerprints
    and settings, so a caller that makes its files one at a time (nkat mix's probes) pays for the
    reference once, not per file."""

    def __init__(self, *, reference: str, text: str, work: Path, runtime: RuntimeSettings, chunks: int, quiet: bool):
        from .evaluate import LogprobStore, chunk_count, fill_store
        from .ppl import read_text
        from ..runtime.engine import Runtime

        self.runtime, self.quiet = runtime, quiet
        ctx = runtime.ctx
        ref_fp = file_key(reference)
        self.settings = {"ctx": ctx, "flash_attn": runtime.flash_attn, "text": text_key(text), "reference": ref_fp}
        self.store = LogprobStore(Path(work) / "reference-logprobs" / ScoreCache.key(self.settings))
        self.cache = ScoreCache(Path(work) / "scores.json")
        ref_rt = Runtime.from_settings(reference, None, runtime)
        try:
            self.tokens = ref_rt.tokenize(read_text(text))
            self.n_chunks = chunk_count(len(self.tokens), ctx, chunks)
            ref_key = ScoreCache.key(self.settings | {"chunks": self.n_chunks, "model": ref_fp, "what": "reference"})
            self.reference_result = self.cache.get(ref_key)
            if self.reference_result is None or not all(self.store.has(c) for c in range(self.n_chunks)):
                say(f"[score] reference: {self.n_chunks} chunks x {ctx} tokens", quiet)
                self.reference_result = fill_store(ref_rt, self.tokens, ctx, self.n_chunks, self.store, quiet)
                self.cache.put(ref_key, self.reference_result)
            self.runtime_settings = {k: v for k, v in ref_rt.settings().items()
                                     if k in ("n_batch", "threads", "n_gpu_layers")}
        finally:
            ref_rt.close()

    def score(self, row: ScoredRow) -> ScoredRow:
        """Score one row: its figures filled in place (and the row returned)."""
        from .evaluate import score_model
        from ..runtime.engine import Runtime

        if row.kind == RowKind.REFERENCE:
            row.figures = self.reference_result | {"kld_mean": 0.0, "kld_err": 0.0, "kld_p99": 0.0,
                                                   "top1_agreement": 1.0}
            return row
        key = ScoreCache.key(self.settings | {"chunks": self.n_chunks, "model": file_key(row.model),
                                              "theta": file_key(row.theta), "backend": self.runtime.backend})
        result = self.cache.get(key)
        if result is None:
            say(f"[score] {row.label}", self.quiet)
            rt = Runtime.from_settings(row.model, row.theta, self.runtime)
            try:
                result = score_model(rt, self.tokens, self.runtime.ctx, self.n_chunks, self.store, self.quiet,
                                     row.label)
            finally:
                rt.close()
            self.cache.put(key, result)
        row.figures = dict(result)
        return row


def score_rows(rows: list[ScoredRow], *, reference: str, text: str, work: Path, runtime: RuntimeSettings,
               chunks: int, quiet: bool) -> tuple[int, dict]:
    """Score each row against the reference, in place (Scorer).
    Returns the chunks scored and the runtime's settings."""
    scorer = Scorer(reference=reference, text=text, work=work, runtime=runtime, chunks=chunks, quiet=quiet)
    for row in rows:
        scorer.score(row)
    return scorer.n_chunks, scorer.runtime_settings
