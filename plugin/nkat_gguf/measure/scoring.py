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
from dataclasses import asdict
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


def pareto(rows: list[dict], metric: str) -> set[str]:
    """Labels of the rows no other row beats on both bytes (<=) and `metric` (<, lower is better)."""
    best = float("inf")
    front = set()
    for r in sorted(rows, key=lambda r: (r["bytes"], r[metric])):
        if r[metric] < best:
            front.add(r["label"])
            best = r[metric]
    return front


def score_rows(rows: list[dict], *, reference: str, text: str, work: Path, runtime: RuntimeSettings, chunks: int,
               quiet: bool) -> tuple[int, dict]:
    """Score each row ({"model", "theta", "kind", "label"}) against the reference, in place.

    The reference is decoded once and its log-probs kept on disk; then one model at a time is
    loaded, scored and closed. Results are cached per file fingerprints and settings.
    """
    from .evaluate import LogprobStore, chunk_count, fill_store, score_model
    from .ppl import read_text
    from ..runtime.engine import Runtime

    ctx = runtime.ctx
    data = read_text(text)
    ref_fp = file_key(reference)
    settings = {"ctx": ctx, "flash_attn": runtime.flash_attn, "text": text_key(text), "reference": ref_fp}
    store = LogprobStore(Path(work) / "reference-logprobs" / ScoreCache.key(settings))
    cache = ScoreCache(Path(work) / "scores.json")
    ref_rt = Runtime.from_settings(reference, None, runtime)
    try:
        tokens = ref_rt.tokenize(data)
        n_chunks = chunk_count(len(tokens), ctx, chunks)
        ref_key = ScoreCache.key(settings | {"chunks": n_chunks, "model": ref_fp, "what": "reference"})
        ref_result = cache.get(ref_key)
        if ref_result is None or not all(store.has(c) for c in range(n_chunks)):
            say(f"[score] reference: {n_chunks} chunks x {ctx} tokens", quiet)
            ref_result = fill_store(ref_rt, tokens, ctx, n_chunks, store, quiet)
            cache.put(ref_key, ref_result)
        runtime_settings = {k: v for k, v in ref_rt.settings().items() if k in ("n_batch", "threads", "n_gpu_layers")}
    finally:
        ref_rt.close()
    for row in rows:
        if row["kind"] == RowKind.REFERENCE:
            row.update(ref_result, kld_mean=0.0, kld_err=0.0, kld_p99=0.0, top1_agreement=1.0)
            continue
        key = ScoreCache.key(settings | {"chunks": n_chunks, "model": file_key(row["model"]),
                                         "theta": file_key(row["theta"]), "backend": runtime.backend})
        result = cache.get(key)
        if result is None:
            say(f"[score] {row['label']}", quiet)
            rt = Runtime.from_settings(row["model"], row["theta"], runtime)
            try:
                result = score_model(rt, tokens, ctx, n_chunks, store, quiet, row["label"])
            finally:
                rt.close()
            cache.put(key, result)
        row.update(result)
    return n_chunks, runtime_settings
