"""nkat convert: model (+ reference, + imatrix) -> theta per weight matrix -> .nkat file.

Tensor by tensor: each weight is dequantized, turned into factors and dropped before the next,
so memory holds one or two matrices in float32 plus the (small) factors.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import lowrank as theta_math
from ..errors import BadSetting, Setting, UserError
from ..formats.gguf_io import ModelFile
from ..formats.nkat_format import NkatMeta, ThetaFactors, factor_bytes, write_nkat
from ..util.output_paths import check_output_path
from ..util.report import progress, say

# Budgeted allocation searches ranks up to this multiple of --theta-rank (capped).
RANK_SEARCH_FACTOR = 4
RANK_SEARCH_CAP = 256
# Bytes a matrix's two tensors add to the file besides their data: GGUF tensor info (name
# string, dims, type, offset) and up to 31 bytes of alignment padding each.
TENSOR_OVERHEAD = 2 * (8 + 4 + 2 * 8 + 4 + 8 + 31)
# Header and metadata of a .nkat without tensors, with room for long paths in nkat.*.
FILE_OVERHEAD = 8192


@dataclass
class ConvertOptions:
    rank: int = 32
    gamma: float | None = None
    source: str = "residual"
    structure: str = "general"
    theta_type: str = "q8_0"
    reference: str | None = None
    imatrix: str | None = None
    covariance: str | None = None
    layers: list[str] = field(default_factory=list)
    budget_mb: float | None = None  # set (or budget_pct) -> ranks by the greedy cut, file <= budget
    budget_pct: float | None = None  # percent of the base file's bytes
    max_matrices: int | None = None  # with a budget: at most this many matrices get theta
    quiet: bool = False

    def resolved_gamma(self) -> float:
        return theta_math.source_info(self.source).default_gamma if self.gamma is None else float(self.gamma)


def validate(opts: ConvertOptions) -> None:
    source = theta_math.source_info(opts.source)
    if source.needs_reference and not opts.reference:
        raise BadSetting(Setting.SOURCE, f"{opts.source} needs", Setting.REFERENCE,
                         "REF.gguf (a higher-precision copy of the model)")
    if source.statistics == "diagonal" and not opts.imatrix:
        raise BadSetting(Setting.SOURCE, f"{opts.source} needs", Setting.IMATRIX, "FILE (make one with nkat calibrate)")
    if source.statistics == "covariance" and not (opts.covariance or opts.imatrix):
        raise BadSetting(Setting.SOURCE, f"{opts.source} needs", Setting.COVARIANCE,
                         "FILE (make one with nkat calibrate --covariance)")
    gamma = opts.resolved_gamma()
    if not np.isfinite(gamma) or gamma == 0:
        raise BadSetting(Setting.THETA_GAMMA, f"must be finite and non-zero, not {opts.gamma}")
    if opts.rank <= 0:
        raise BadSetting(Setting.THETA_RANK, f"must be positive, not {opts.rank}")
    if opts.budget_mb is not None and opts.budget_mb <= 0:
        raise BadSetting(Setting.BUDGET_MB, f"must be positive, not {opts.budget_mb}")
    if opts.budget_mb is not None and opts.budget_pct is not None:
        raise BadSetting("give one budget:", Setting.BUDGET_MB, "or", Setting.BUDGET_PCT)
    if opts.max_matrices is not None and (opts.max_matrices <= 0 or (opts.budget_mb is None and opts.budget_pct is None)):
        raise BadSetting(Setting.MAX_MATRICES, "N needs a positive N and a budget (", Setting.BUDGET_MB, "or",
                         Setting.BUDGET_PCT, ")")


def open_reference(model: ModelFile, path: str, names: list[str]) -> ModelFile:
    ref = ModelFile(path)
    if ref.architecture != model.architecture:
        raise UserError(f"{path}: architecture {ref.architecture}, but {model.path.name} is {model.architecture}")
    for name in names:
        if name not in ref.tensors:
            raise UserError(f"{path}: has no tensor {name}")
        if ref.shape(name) != model.shape(name):
            raise UserError(f"{path}: {name} is {ref.shape(name)}, the model's is {model.shape(name)}")
    return ref


def load_scales(path: str, names: list[str]) -> dict[str, np.ndarray]:
    from ..formats.imatrix import column_scales, read_imatrix

    stats = read_imatrix(path)
    missing = [n for n in names if n not in stats]
    if missing:
        raise UserError(f"{path}: no activation statistics for {missing[0]} ({len(missing)} tensors missing)")
    return {n: column_scales(*stats[n]) for n in names}


class Statistics:
    """What a source weights the residual with, per tensor: nothing, column scales (imatrix) or
    the input covariance's Cholesky factor (computed once per distinct input, kept for a block)."""

    def __init__(self, source: str, names: list[str], imatrix: str | None, covariance: str | None):
        from ..formats.covariance import CovarianceFile

        kind = theta_math.source_info(source).statistics
        self.cov = CovarianceFile(covariance) if kind == "covariance" and covariance else None
        self.diagonal_only = [n for n in names if kind == "covariance" and (self.cov is None or n not in self.cov)]
        wants_scales = names if kind == "diagonal" else self.diagonal_only
        if self.diagonal_only and not imatrix:
            where = covariance or "the statistics"
            raise BadSetting(f"{where}: no covariance for {self.diagonal_only[0]} ({len(self.diagonal_only)} "
                             "tensors; pass", Setting.IMATRIX, "to use their diagonal)")
        self.scales = load_scales(imatrix, wants_scales) if wants_scales else {}
        self._roots: dict[str, np.ndarray] = {}

    def root(self, name: str) -> np.ndarray | None:
        """L with L L^T = R + delta I of name's input, or None where the source uses no covariance."""
        if self.cov is None or name not in self.cov:
            return None
        key = self.cov.input_key(name)
        if key not in self._roots:
            if len(self._roots) >= 4:  # at most one block's distinct inputs at a time
                self._roots.clear()
            self._roots[key] = theta_math.covariance_root(self.cov.autocorrelation(name))
        return self._roots[key]

    def notice(self) -> str | None:
        if not self.diagonal_only:
            return None
        return (f"note: {len(self.diagonal_only)} tensors have only diagonal statistics: "
                "residual-act (imatrix) for them, residual-cov for the rest")


def correction_pq(model: ModelFile, ref: ModelFile | None, name: str, source: str, rank: int,
                  col_scale: np.ndarray | None = None, cov_root: np.ndarray | None = None):
    """P, Q with E ~ P Q^T at `rank` for one tensor, E being what `source` corrects (with cov_root L,
    the exact whitened solution)."""
    W = model.dequantize(name)
    E = theta_math.correction_matrix(source, W, ref.dequantize(name) if ref else None)
    del W
    try:
        if cov_root is None:
            return theta_math.low_rank(E, rank, col_scale)
        P, Q, _ = theta_math.whitened_low_rank(E, cov_root, rank)
        return P, Q
    except UserError as exc:
        raise UserError(f"{model.path.name}: {name}: {exc}") from None


def truncated_theta(name: str, P: np.ndarray, Q: np.ndarray, rank: int, structure: str) -> ThetaFactors:
    """The theta of the first `rank` components of P, Q in a resolved structure."""
    B, A = theta_math.structure_factors(P[:, :rank], Q[:, :rank], structure)
    return ThetaFactors(name, A, B)


def _matrix_factors(model, ref, name, opts, stats: Statistics, rank):
    """P, Q (E ~ P Q^T) for one tensor at `rank`, and its resolved structure (checked first)."""
    shape = model.shape(name)
    structure = theta_math.resolve_structure(opts.structure, shape)
    theta_math.check_rank(rank, shape, name)
    P, Q = correction_pq(model, ref, name, opts.source, rank, stats.scales.get(name), stats.root(name))
    return P, Q, structure


def budget_bytes(opts: ConvertOptions, base_bytes: int) -> int | None:
    """The .nkat file's size limit: --budget-mb MiB, or --budget-pct percent of the base file."""
    if opts.budget_pct is not None:
        if not 0 < opts.budget_pct <= 100:
            raise BadSetting(Setting.BUDGET_PCT, f"must be in (0, 100], not {opts.budget_pct}")
        return int(opts.budget_pct / 100 * base_bytes)
    return None if opts.budget_mb is None else int(opts.budget_mb * 1024 * 1024)


def convert(input_path: str, output_path: str, opts: ConvertOptions) -> dict:
    validate(opts)
    budget = budget_bytes(opts, Path(input_path).stat().st_size) if Path(input_path).is_file() else None
    return convert_budgets(input_path, [(output_path, budget)], opts)[0]


def convert_budgets(input_path: str, outputs: list[tuple[str, int | None]], opts: ConvertOptions) -> list[dict]:
    """Several .nkat files from one pass of SVDs: each (output, byte budget or None for uniform rank).

    The factors are computed once at the largest rank any output needs; each output truncates them.
    """
    validate(opts)
    for output_path, _ in outputs:
        check_output_path(output_path, [input_path, opts.reference, opts.imatrix, opts.covariance], Setting.OUTPUT)
    started = time.perf_counter()
    model = ModelFile(input_path)
    if model.is_adapter:
        raise UserError(f"{input_path}: is an adapter, not a model")
    names = model.target_names(opts.layers or None)
    source = theta_math.source_info(opts.source)
    ref = open_reference(model, opts.reference, names) if source.needs_reference else None
    stats = Statistics(opts.source, names, opts.imatrix, opts.covariance)
    if stats.notice():
        say(stats.notice())  # always: it changes the method for those tensors
    gamma = opts.resolved_gamma()
    budgeted = any(budget is not None for _, budget in outputs)

    pieces = {}
    for name in progress(names, desc="theta", quiet=opts.quiet, unit="tensor"):
        rank = min(opts.rank * RANK_SEARCH_FACTOR, RANK_SEARCH_CAP, min(model.shape(name))) if budgeted else opts.rank
        pieces[name] = _matrix_factors(model, ref, name, opts, stats, rank)
    svd_seconds = time.perf_counter() - started

    summaries = []
    for output_path, budget in outputs:
        t0 = time.perf_counter()
        ranks = _budget_ranks(model, pieces, opts, budget) if budget is not None else {n: opts.rank for n in names}
        all_factors = [truncated_theta(name, pieces[name][0], pieces[name][1], ranks[name], pieces[name][2])
                       for name in names if ranks[name] > 0]
        if not all_factors:
            raise UserError(f"the budget of {budget} bytes is too small for even one rank of one matrix")
        summary = _write(model, ref, output_path, all_factors, opts, gamma, budget, stats)
        summary["matrices"] = len(names)
        summary["seconds"] = svd_seconds + time.perf_counter() - t0
        summaries.append(summary)
    return summaries


def _write(model, ref, output_path, all_factors, opts, gamma, budget, stats) -> dict:
    structures = {theta_math.resolve_structure(opts.structure, model.shape(f.name)) for f in all_factors}
    extra = {"rank_allocation": "budget" if budget is not None else "uniform"}
    if opts.covariance:
        extra["covariance"] = str(opts.covariance)
    if budget is not None:
        extra["budget_bytes"] = budget
    meta = NkatMeta(
        theta_rank=opts.rank,
        theta_gamma=gamma,
        source=opts.source,
        structure=opts.structure if len(structures) > 1 or opts.structure != "auto" else structures.pop(),
        theta_type=opts.theta_type,
        base=model.identity(),
        reference=ref.identity() if ref else None,
        imatrix=str(opts.imatrix or ""),
        extra=extra,
    )
    theta_bytes = write_nkat(output_path, model.architecture, all_factors, meta)
    file_bytes = Path(output_path).stat().st_size
    if budget is not None and file_bytes > budget:  # the allocation's byte count is wrong: a bug
        raise RuntimeError(f"{output_path}: {file_bytes} bytes, over the budget of {budget}")
    stored_ranks = [f.rank for f in all_factors]
    return {
        "output": str(output_path),
        "model": str(model.path),
        "reference": str(opts.reference) if opts.reference else None,
        "source": opts.source,
        "structure": opts.structure,
        "theta_rank": opts.rank,
        "theta_gamma": gamma,
        "theta_type": opts.theta_type,
        "tensors": len(all_factors),
        "stored_rank_min": min(stored_ranks),
        "stored_rank_max": max(stored_ranks),
        "ranks": {f.name: f.rank for f in all_factors},
        "budget_bytes": budget,
        "file_bytes": file_bytes,
        "diagonal_fallback": len(stats.diagonal_only),
        "theta_bytes": theta_bytes,
        "base_bytes": model.file_size,
        "rho": theta_bytes / model.file_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _budget_ranks(model, pieces, opts, budget: int) -> dict[str, int]:
    """Every matrix's rank by the greedy cut, spending as much of `budget` as the real file sizes allow.

    The cut prices one rank at the worst storage (lora_b falls back to F16 when its row, the rank,
    is not a multiple of 32), which never overspends but leaves up to half of lora_b's bytes unused
    at Q8_0 ranks. So the cut is rerun with a larger nominal budget, bisected, as long as the file it
    gives (priced exactly) still fits: the cut is monotone in the budget, so this keeps its order."""
    gains, costs, first, per_component = {}, {}, {}, {}
    for name, (P, Q, structure) in pieces.items():
        n_out, n_in = model.shape(name)
        per_component[name] = 2 if structure == "antisymmetric" else 1
        costs[name] = per_component[name] * factor_bytes(n_out, n_in, 1, opts.theta_type)
        first[name] = TENSOR_OVERHEAD + 2 * len(name) + len(".lora_a.lora_b")
        # S_k^2 of the SVD (P = U S): for residual-cov the output error each component removes
        gains[name] = (P.astype(np.float64) ** 2).sum(axis=0)

    def cut(nominal: float) -> dict[str, int]:
        return theta_math.allocate_ranks(gains, costs, nominal - FILE_OVERHEAD, first, opts.max_matrices)

    def file_bytes(ranks: dict[str, int]) -> int:
        return FILE_OVERHEAD + sum(factor_bytes(*model.shape(n), per_component[n] * r, opts.theta_type) + first[n]
                                   for n, r in ranks.items() if r)

    best, low, high = cut(budget), float(budget), 2.0 * budget
    for _ in range(16):
        mid = (low + high) / 2
        ranks = cut(mid)
        if file_bytes(ranks) <= budget:
            best, low = ranks, mid
        else:
            high = mid
    return best
