"""Cost curves: per tensor and candidate type, exact bytes and the output error the type causes.

damage = E||(W_ref - W_t) x||^2 = tr(dW R dW^T) over the calibration inputs x, with R = E[x x^T]
(the full input covariance where a covariance file is given, its diagonal from the imatrix
otherwise; for token_embd the importance formats.embedding_importance derives, the identity where
there is none). W_t is exactly what llama.cpp writes: ggml's own quantizer (runtime.ggml_quants)
with the imatrix (token_embd: the derived one) as importance, on evenly spaced sampled rows (rows
are independent in every type), scaled to the whole tensor.
energy = E||W_ref x||^2 on the same rows: damage / energy is the tensor's relative output error,
comparable across tensors. The type a tensor is stored in costs no damage: llama.cpp copies a
tensor whose requested type is its stored type (quantizing it again would not give exactly the
same values back, and then a larger type such as Q4_1 looked better than keeping Q4_K).

Curves are cached on disk by content: the reference's and statistics' fingerprints and the
settings, saved after every tensor so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..formats.gguf_io import fingerprint_file, open_gguf
from ..formats.imatrix import mean_squares, read_imatrix
from ..runtime import ggml_quants
from ..util.atomic import write_text_atomic
from ..util.report import progress
from .candidates import CANDIDATE_TYPES, TensorShape, candidate_types, is_allocated

COSTS_VERSION = 1
DEFAULT_ROWS = 128


@dataclass
class TensorCost:
    name: str
    n_out: int
    n_in: int
    ref_type: str
    energy: float  # E||W_ref x||^2, whole tensor (scaled from the sampled rows)
    options: dict[str, tuple[int, float]]  # type -> (bytes, damage)

    def relative(self, qtype: str) -> float:
        return self.options[qtype][1] / self.energy if self.energy > 0 else 0.0

    def as_stored(self) -> "TensorCost":
        """The stored type's damage set to 0: llama.cpp copies the tensor as stored."""
        if self.ref_type not in self.options:
            return self
        return replace(self, options=self.options | {self.ref_type: (self.options[self.ref_type][0], 0.0)})


def sample_rows(n_out: int, n_rows: int | None) -> np.ndarray:
    """Evenly spaced row indices (all rows when n_rows is None or not smaller)."""
    if n_rows is None or n_rows >= n_out:
        return np.arange(n_out)
    return np.unique(np.linspace(0, n_out - 1, n_rows).round().astype(np.int64))


def reference_rows(tensor, rows: np.ndarray) -> np.ndarray:
    """Rows of a GGUF tensor as float32 (n, n_in), dequantized by ggml's own to_float."""
    n_in = int(tensor.shape[0])
    raw = np.asarray(tensor.data).view(np.uint8).reshape(int(tensor.shape[1]), -1)
    return ggml_quants.dequantize_rows(tensor.tensor_type, raw[rows], n_in)


class Statistics:
    """The input statistics of the reference: importance (imatrix E[x^2]) and, with a covariance
    file, the full R = E[x x^T]."""

    def __init__(self, imatrix: str | None = None, covariance: str | None = None, reference: str | None = None):
        from ..formats.covariance import CovarianceFile
        from ..formats.embedding_importance import embedding_importance

        self.imatrix_path, self.covariance_path = imatrix, covariance
        self.stats = read_imatrix(imatrix) if imatrix else {}
        self.cov = CovarianceFile(covariance) if covariance else None
        # with the reference: token_embd's importance (what quantize_model(weigh_embedding=True) uses)
        self.extra = {n: v for n, v in (embedding_importance(reference) if reference else {}).items()
                      if n not in self.stats}

    def importance(self, name: str) -> np.ndarray | None:
        """What llama.cpp passes to the quantizer for this tensor: sum of x^2 / count, float32."""
        if name in self.extra:
            return self.extra[name]
        return mean_squares(*self.stats[name]) if name in self.stats else None

    def key(self) -> dict:
        key = {"imatrix": fingerprint_file(self.imatrix_path) if self.imatrix_path else None,
               "covariance": fingerprint_file(self.covariance_path) if self.covariance_path else None}
        if self.extra:
            key["extra"] = hashlib.sha256(b"".join(n.encode() + v.tobytes() for n, v in sorted(self.extra.items()))
                                          ).hexdigest()[:16]
        return key


def input_weights(name: str, stats: Statistics, importance: np.ndarray | None):
    """R for a tensor: the full covariance (n_in, n_in), its diagonal (n_in,), or None (identity)."""
    if stats.cov is not None and name in stats.cov:
        return stats.cov.autocorrelation(name)
    return None if importance is None else importance.astype(np.float64)


def output_error(rows: np.ndarray, r) -> float:
    """sum over rows of row R row^T, R full (2-D), diagonal (1-D) or the identity (None)."""
    rows = rows.astype(np.float64, copy=False)
    if r is None:
        return float(np.einsum("ij,ij->", rows, rows))
    if r.ndim == 1:
        return float(np.einsum("ij,j,ij->", rows, r, rows))
    return float(np.einsum("ij,ij->", rows @ r, rows))


def tensor_cost(tensor, stats: Statistics, n_rows: int | None, types=CANDIDATE_TYPES,
                threads: int | None = None, known: TensorCost | None = None) -> TensorCost:
    """One tensor's curve: every candidate type's bytes (whole tensor) and damage (from sampled rows).
    The points of `known` (the same tensor, rows and statistics) are kept; only the missing types
    are quantized."""
    name = tensor.name
    shape = TensorShape(name, int(tensor.shape[1]), int(tensor.shape[0]))
    importance = stats.importance(name)
    rows = sample_rows(shape.n_out, n_rows)
    w = reference_rows(tensor, rows)
    scale = shape.n_out / len(rows)
    r = input_weights(name, stats, importance)
    energy = known.energy if known else output_error(w, r) * scale
    options = dict(known.options) if known else {}
    for t in candidate_types(shape, importance is not None, types):
        if t in options:
            continue
        if t == tensor.tensor_type.name:
            damage = 0.0  # copied as stored
        else:
            damage = output_error(w - ggml_quants.roundtrip(t, w, importance, threads), r) * scale
        options[t] = (shape.n_out * ggml_quants.row_bytes(t, shape.n_in), damage)
    return TensorCost(name, shape.n_out, shape.n_in, tensor.tensor_type.name, energy, options)


def costs_key(reference: str, stats: Statistics, n_rows: int | None) -> str:
    # "types" stays in the key (always the whole list) so caches written before it left keep their name
    parts = {"version": COSTS_VERSION, "reference": fingerprint_file(reference), "rows": n_rows,
             "types": list(CANDIDATE_TYPES)} | stats.key()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def model_costs(reference: str, stats: Statistics, work_dir, n_rows: int | None = DEFAULT_ROWS,
                types=CANDIDATE_TYPES, threads: int | None = None, quiet: bool = False) -> dict[str, TensorCost]:
    """Every allocated tensor's curve over `types`, cached in work_dir/costs-<content key>.json.
    A type's point does not depend on the other types, so one cache serves every type list: a run
    with other types quantizes only the points the cache lacks."""
    path = Path(work_dir) / f"costs-{costs_key(reference, stats, n_rows)}.json"
    done = {}
    if path.is_file():  # caches written before the stored type cost 0 get it here
        done = {n: TensorCost(**{**c, "options": {t: tuple(v) for t, v in c["options"].items()}}).as_stored()
                for n, c in json.loads(path.read_text()).items()}
    tensors = [t for t in open_gguf(reference).tensors if is_allocated(t.name, len(t.shape))]

    def wanted(t) -> list[str]:
        shape = TensorShape(t.name, int(t.shape[1]), int(t.shape[0]))
        return candidate_types(shape, stats.importance(t.name) is not None, types)

    todo = [t for t in tensors if t.name not in done or any(q not in done[t.name].options for q in wanted(t))]
    for tensor in progress(todo, desc="costs", unit="tensor", quiet=quiet):
        done[tensor.name] = tensor_cost(tensor, stats, n_rows, types, threads, done.get(tensor.name))
        write_text_atomic(path, json.dumps({n: asdict(c) for n, c in done.items()}))
    return {t.name: replace(done[t.name], options={q: done[t.name].options[q] for q in wanted(t)}) for t in tensors}
