"""GPTQ inside `nkat mix --gptq COV`: which tensors it rounds, and (`--gptq-priced`) its price as an
option of the allocation.

By default GPTQ rounds every tensor it can in the type the allocation chose (rounded_tensors). With
--gptq-priced it is instead one more option per tensor and type, priced as below; measured on
Qwen2.5-Coder-1.5B, the priced allocation lost to rounding after the allocation at both budgets
tried (docs/RESULTS.md): its in-sample shares (0.2-0.4) promise far more than GPTQ delivers.

A block matrix with an input covariance can take a type t as llama.cpp rounds it, or t rounded by
GPTQ error propagation under that covariance (runtime.gptq): the same bytes, less output error. The
option 't+gptq' costs t's bytes and t's damage times GPTQ's share,
    share = tr(E_gptq R E_gptq^T) / tr(E_t R E_t^T),
E_gptq and E_t the errors of GPTQ's and ggml's rounding (ggml with the imatrix, as llama.cpp
writes it) on the cost curves' sampled rows, R the covariance's autocorrelation. Rows are
independent in GPTQ (a row's rounding error moves only along that row), so the sampled rows'
GPTQ bytes are exactly those rows of the whole tensor's. The share is then applied to t's damage on
the curve, so the option lives in the same units as every other (and the fit's weights hold).

The share is measured on the text the covariance was collected from, the text GPTQ is fitted to:
it is in sample. On the demo model's matrices in-sample ratios were about 0.5 where held-out text
gave 0.64-0.85 (issue 22); on the 1.5B they came out 0.2-0.4, and the allocation over-valued GPTQ.

Which gains are priced: every candidate type of a covered block matrix except the one it is stored
in (llama.cpp copies that) and unblocked types (F16). Cached by content in the work dir, saved after
every input, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats.covariance import CovarianceFile
from ..formats.gguf_io import fingerprint_file, open_gguf
from ..runtime import ggml_quants
from ..runtime.gptq import REVISION, gptq_factor, gptq_quantize_matrix
from ..runtime.gptq_file import can_round
from ..util.atomic import write_text_atomic
from ..util.report import progress
from ..util.signals import raise_if_terminated
from .costs import Statistics, TensorCost, output_error, reference_rows, sample_rows

SUFFIX = "+gptq"
SHARES_VERSION = 1


def option_name(qtype: str) -> str:
    return qtype + SUFFIX


def split_gptq(options: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """A recipe's options -> (the options without '+gptq', the tensors GPTQ rounds)."""
    plain, rounded = {}, set()
    for name, option in options.items():
        if option.endswith(SUFFIX):
            option = option[: -len(SUFFIX)]
            rounded.add(name)
        plain[name] = option
    return plain, rounded


def priceable(cost: TensorCost, cov: CovarianceFile) -> list[str]:
    """The types of a tensor's curve GPTQ can round it in (gptq_file.can_round), but its stored type:
    llama.cpp copies that, so there is nothing to round."""
    return [t for t in cost.options if t != cost.ref_type and can_round(cost.name, t, cov)]


def rounded_tensors(options: dict[str, str], costs: dict[str, TensorCost], cov: CovarianceFile,
                    priced: bool) -> set[str]:
    """The tensors GPTQ rounds in a recipe's file: those given a 'T+gptq' option (priced), or every
    tensor it can round in the type the allocation chose."""
    plain, chosen = split_gptq(options)
    if priced:
        return chosen
    return {n for n, o in plain.items() if o != costs[n].ref_type and can_round(n, o, cov)}


@dataclass
class Share:
    """Output error of ggml's rounding and of GPTQ's on the sampled rows, under the covariance."""
    plain: float
    gptq: float

    @property
    def ratio(self) -> float:
        return self.gptq / self.plain if self.plain > 0 else 1.0


def shares_key(reference: str, stats: Statistics, covariance: str, damp: float, rows: int | None) -> str:
    parts = {"version": SHARES_VERSION, "gptq_revision": REVISION, "reference": fingerprint_file(reference),
             "gptq_covariance": fingerprint_file(covariance), "damp": damp, "rows": rows} | stats.key()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def tensor_shares(tensor, stats: Statistics, R: np.ndarray, factors: dict, types: list[str], rows: int | None,
                  damp: float, threads: int | None) -> dict[str, Share]:
    """One tensor's shares at `types`; factors (block length -> GptqFactor of R) is filled and reused
    by the other matrices of the same input."""
    w = reference_rows(tensor, sample_rows(int(tensor.shape[1]), rows))
    importance = stats.importance(tensor.name)
    out = {}
    for t in types:
        bs = ggml_quants.block_size(t)
        if bs not in factors:
            factors[bs] = gptq_factor(R, bs, damp)
        plain = ggml_quants.roundtrip(t, w, importance, threads)
        rounded = ggml_quants.dequantize_rows(t, gptq_quantize_matrix(w, None, t, threads=threads,
                                                                      factor=factors[bs]), w.shape[1])
        out[t] = Share(output_error(w - plain, R), output_error(w - rounded, R))
    return out


def model_shares(reference: str, stats: Statistics, covariance: str, costs: dict[str, TensorCost], damp: float,
                 rows: int | None, work_dir, threads: int | None = None, quiet: bool = False) \
        -> dict[str, dict[str, Share]]:
    """name -> type -> Share for every priceable (tensor, type), input by input (each input's
    covariance read and factored once), cached in work_dir/gptq-shares-<key>.json."""
    cov = CovarianceFile(covariance)
    path = Path(work_dir) / f"gptq-shares-{shares_key(reference, stats, covariance, damp, rows)}.json"
    done: dict[str, dict[str, Share]] = {}
    if path.is_file():
        done = {n: {t: Share(**s) for t, s in by.items()} for n, by in json.loads(path.read_text()).items()}
    wanted = {n: priceable(c, cov) for n, c in costs.items()}
    todo = {n: [t for t in types if t not in done.get(n, {})] for n, types in wanted.items()}
    todo = {n: types for n, types in todo.items() if types}
    tensors = {t.name: t for t in open_gguf(reference).tensors if t.name in todo}
    by_input: dict[str, list[str]] = {}
    for name in todo:
        by_input.setdefault(cov.input_key(name), []).append(name)
    bar = progress(total=sum(map(len, todo.values())), desc="gptq prices", unit="option", quiet=quiet)
    try:
        for names in by_input.values():
            R, factors = cov.autocorrelation(names[0]), {}
            for name in names:
                raise_if_terminated()
                done.setdefault(name, {}).update(
                    tensor_shares(tensors[name], stats, R, factors, todo[name], rows, damp, threads))
                bar.update(len(todo[name]))
            del R, factors
            write_text_atomic(path, json.dumps({n: {t: s.__dict__ for t, s in by.items()} for n, by in done.items()}))
    finally:
        bar.close()
    return {n: {t: done[n][t] for t in types} for n, types in wanted.items() if types}


def gptq_options(costs: dict[str, TensorCost], shares: dict[str, dict[str, Share]]) \
        -> dict[str, dict[str, tuple[int, int, float]]]:
    """name -> 'T+gptq' -> (GGUF bytes, 0 side-file bytes, damage): MixBuilder's extra options."""
    return {name: {option_name(t): (costs[name].options[t][0], 0, costs[name].options[t][1] * s.ratio)
                   for t, s in by_type.items()}
            for name, by_type in shares.items()}
