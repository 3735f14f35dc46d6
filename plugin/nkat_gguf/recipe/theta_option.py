"""Theta as one more option of the allocation (`nkat mix --theta`).

A block matrix at type t can also take t plus a rank-r theta: the first r components of what t
loses, E = W_ref - W_t, whitened by the same input statistics as the cost curves (the imatrix's
column scales, or the covariance's Cholesky factor). Its damage is t's damage times the share of
E's whitened energy those components leave, computed on the whole tensor (W_t by ggml's own
quantizer, exactly what llama.cpp writes); its bytes are t's plus the two factor tensors in the
.nkat (theta/pipeline.Pricing), so the Lagrangian sweep weighs a rank against a type upgrade in
one unit. theta is chosen only where it removes more damage per byte than the types around it.

Gains are priced for the types the plain allocation chose at the asked budgets and the next
cheaper type on each hull (theta on a cheaper type is theta's real bid), cached by content.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats.gguf_io import fingerprint_file, is_target_name, open_gguf
from ..formats.nkat_format import factor_bytes
from ..runtime import ggml_quants
from ..theta.pipeline import FILE_OVERHEAD, Pricing, Statistics as ThetaStatistics, component_gains, factor
from ..util.atomic import write_text_atomic
from ..util.report import progress
from .allocate import lower_hull
from .costs import Statistics, TensorCost, reference_rows

THETA_RANKS = (8, 16, 32, 64)
THETA_TYPE = "q8_0"  # the .nkat's INT8 storage (lora_b falls back to F16 at ranks not a multiple of 32)
THETA_GAMMA = 2.0  # y = W x + 0.5 gamma theta x: the whole residual component
THETA_FIXED_BYTES = FILE_OVERHEAD  # the .nkat's header and metadata, charged once when theta is offered
_SEP = "+r"
GAINS_VERSION = 1


def option_name(qtype: str, rank: int) -> str:
    return f"{qtype}{_SEP}{rank}"


def split_option(option: str) -> tuple[str, int]:
    """'Q3_K+r16' -> ('Q3_K', 16); 'Q3_K' -> ('Q3_K', 0)."""
    qtype, _, rank = option.partition(_SEP)
    return qtype, int(rank) if rank else 0


def split_recipe(recipe: dict[str, str]) -> tuple[dict[str, str], dict[str, int]]:
    """A recipe with theta options -> (tensor types for llama.cpp, ranks of the matrices with theta)."""
    types, ranks = {}, {}
    for name, option in recipe.items():
        types[name], rank = split_option(option)
        if rank:
            ranks[name] = rank
    return types, ranks


def theta_source(imatrix: str | None, covariance: str | None) -> str:
    """The `nkat convert` source whose fit the priced gains and the written .nkat share."""
    return "residual-cov" if covariance else "residual-act" if imatrix else "residual"


def whitening(stats: Statistics, names: list[str]) -> ThetaStatistics:
    """The theta pipeline's statistics for these matrices: what both the gains and the .nkat weigh the
    residual with (column scales, or covariance roots cached per input)."""
    return ThetaStatistics(theta_source(stats.imatrix_path, stats.covariance_path), names, stats.imatrix_path,
                           stats.covariance_path)


def matrix_theta_bytes(name: str, n_out: int, n_in: int, rank: int) -> int:
    """What a rank-r general theta adds to the .nkat for this matrix: data and tensor infos."""
    pricing = Pricing({name: (n_out, n_in)}, {name: "general"}, THETA_TYPE)
    return factor_bytes(n_out, n_in, rank, THETA_TYPE) + pricing.first_bytes(name)


@dataclass
class ThetaGain:
    """The whitened residual of one tensor at one type: its energy and the first components' S^2."""
    energy: float
    s2: list[float]

    def kept_share(self, rank: int) -> float:
        """The share of the type's damage left with a rank-r theta."""
        if self.energy <= 0:
            return 1.0
        return max(0.0, 1.0 - float(np.sum(self.s2[:rank])) / self.energy)


def residual_gain(tensor, stats: Statistics, qtype: str, max_rank: int, threads: int | None,
                  weights: ThetaStatistics | None = None) -> ThetaGain:
    """The whole tensor at qtype (ggml's quantizer with the imatrix), and the first max_rank
    components of its residual as the theta pipeline fits them (theta.pipeline.factor, weighted by
    `weights`, default whitening(stats)): their S^2 and the weighted residual's whole energy."""
    name = tensor.name
    weights = weights or whitening(stats, [name])
    w = reference_rows(tensor, np.arange(int(tensor.shape[1])))
    E = w - ggml_quants.roundtrip(qtype, w, stats.importance(name), threads)
    del w
    P, _ = factor(E, name, weights, min(max_rank, *E.shape))
    root, scales = weights.root(name), weights.scales.get(name)
    X = E.astype(np.float64) @ root if root is not None else E if scales is None else E * scales[None, :]
    return ThetaGain(float(np.einsum("ij,ij->", X, X, dtype=np.float64)), component_gains(P).tolist())


def types_to_price(costs: dict[str, TensorCost], chosen: list[dict[str, str]],
                   layers: list[str] | None = None) -> dict[str, list[str]]:
    """Per block matrix (those matching a `layers` glob, if given), the types worth a theta price:
    those chosen at the budgets and, for each, the next cheaper type on the matrix's own hull of
    (bytes, relative damage). The reference's own type is left out: llama.cpp copies such a tensor
    as stored, so there is no residual to correct."""
    out: dict[str, list[str]] = {}
    for name, cost in costs.items():
        if not is_target_name(name) or (layers and not any(fnmatch.fnmatchcase(name, g) for g in layers)):
            continue
        options = list(cost.options)
        b = np.array([cost.options[t][0] for t in options])
        d = np.array([cost.options[t][1] for t in options])
        hull = [options[i] for i in lower_hull(b, d)]
        want = []
        for recipe in chosen:
            t = recipe.get(name)
            if t in hull:
                i = hull.index(t)
                want += [t] + ([hull[i - 1]] if i > 0 else [])
        want = [t for t in dict.fromkeys(want) if t != cost.ref_type and cost.options[t][1] > 0]
        if want:
            out[name] = want
    return out


def gains_key(reference: str, stats: Statistics) -> str:
    parts = {"version": GAINS_VERSION, "reference": fingerprint_file(reference), "max_rank": max(THETA_RANKS)} \
        | stats.key()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def model_gains(reference: str, stats: Statistics, wanted: dict[str, list[str]], work_dir,
                threads: int | None = None, quiet: bool = False) -> dict[str, dict[str, ThetaGain]]:
    """name -> type -> ThetaGain for every (tensor, type) of `wanted`, cached in work_dir/theta-gains-<key>.json
    (saved after every tensor, so an interrupted run resumes)."""
    path = Path(work_dir) / f"theta-gains-{gains_key(reference, stats)}.json"
    done: dict[str, dict[str, ThetaGain]] = {}
    if path.is_file():
        stored = json.loads(path.read_text())
        done = {n: {t: ThetaGain(**g) for t, g in by_type.items()} for n, by_type in stored.items()}
    tensors = {t.name: t for t in open_gguf(reference).tensors if t.name in wanted}
    todo = [(n, t) for n, types in wanted.items() for t in types if t not in done.get(n, {})]
    weights = whitening(stats, list(dict.fromkeys(n for n, _ in todo))) if todo else None
    for name, qtype in progress(todo, desc="theta gains", unit="matrix", quiet=quiet):
        done.setdefault(name, {})[qtype] = residual_gain(tensors[name], stats, qtype, max(THETA_RANKS), threads,
                                                         weights)
        write_text_atomic(path, json.dumps({n: {t: g.__dict__ for t, g in by.items()} for n, by in done.items()}))
    return {n: {t: done[n][t] for t in types} for n, types in wanted.items()}


def theta_options(costs: dict[str, TensorCost], gains: dict[str, dict[str, ThetaGain]]) \
        -> dict[str, dict[str, tuple[int, int, float]]]:
    """name -> option ('Q3_K+r16') -> (GGUF bytes, .nkat bytes, damage), for every priced type and rank."""
    out = {}
    for name, by_type in gains.items():
        c = costs[name]
        opts = {}
        for qtype, gain in by_type.items():
            gguf_bytes, damage = c.options[qtype]
            for r in THETA_RANKS:
                if r <= min(c.n_out, c.n_in):
                    opts[option_name(qtype, r)] = (gguf_bytes, matrix_theta_bytes(name, c.n_out, c.n_in, r),
                                                   damage * gain.kept_share(r))
        out[name] = opts
    return out


def write_theta(mix_path: str, reference: str, ranks: dict[str, int], output: str, stats: Statistics,
                quiet: bool = True) -> int:
    """The .nkat of the chosen ranks for a written mix: the residual against the reference, weighted
    as the gains were (whitening; the same fit as `nkat convert --source residual-act|residual-cov`).
    Returns the file's bytes."""
    from ..formats.gguf_io import ModelFile
    from ..formats.nkat_format import write_nkat
    from ..theta.pipeline import Allocation, factor_loop, theta_meta, thetas

    model, ref = ModelFile(mix_path), ModelFile(reference)
    names = list(ranks)
    weights = whitening(stats, names)
    source = theta_source(stats.imatrix_path, stats.covariance_path)
    pieces = factor_loop(model, ref, source, weights, ranks, "theta", quiet)
    pricing = Pricing({n: model.shape(n) for n in names}, {n: "general" for n in names}, THETA_TYPE)
    factors = thetas(pieces, pricing, ranks)
    meta = theta_meta(model, ref, factors, pricing, rank=max(ranks.values()), gamma=THETA_GAMMA, source=source,
                      structure="general", imatrix=stats.imatrix_path, covariance=stats.covariance_path,
                      budget=None, allocation=Allocation.MIX)
    write_nkat(output, model.architecture, factors, meta)
    return Path(output).stat().st_size
