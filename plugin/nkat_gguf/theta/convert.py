"""nkat convert: model (+ reference, + imatrix) -> theta per weight matrix -> .nkat file, through
the one theta pipeline (theta/pipeline.py), tensor by tensor."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import lowrank as theta_math
from .lowrank import StatisticsKind
from .pipeline import Pricing, Statistics, choose_ranks, factor_loop, theta_meta, thetas
from ..errors import BadSetting, Setting, UserError
from ..formats.gguf_io import ModelFile
from ..formats.nkat_format import write_nkat
from ..util.output_paths import check_output_path
from ..util.report import say

# Budgeted allocation searches ranks up to this multiple of --theta-rank (capped).
RANK_SEARCH_FACTOR = 4
RANK_SEARCH_CAP = 256


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
    if source.statistics == StatisticsKind.DIAGONAL and not opts.imatrix:
        raise BadSetting(Setting.SOURCE, f"{opts.source} needs", Setting.IMATRIX, "FILE (make one with nkat calibrate)")
    if source.statistics == StatisticsKind.COVARIANCE and not (opts.covariance or opts.imatrix):
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


def budget_bytes(opts: ConvertOptions, base_bytes: int) -> int | None:
    """The .nkat file's size limit: --budget-mb MiB, or --budget-pct percent of the base file."""
    if opts.budget_pct is not None:
        if not 0 < opts.budget_pct <= 100:
            raise BadSetting(Setting.BUDGET_PCT, f"must be in (0, 100], not {opts.budget_pct}")
        return int(opts.budget_pct / 100 * base_bytes)
    return None if opts.budget_mb is None else int(opts.budget_mb * 1024 * 1024)


@dataclass
class ConversionSummary:
    """What one .nkat of a conversion holds and what it cost (the JSON of nkat convert, in order)."""

    output: str
    model: str
    reference: str | None
    source: str
    structure: str
    theta_rank: int
    theta_gamma: float
    theta_type: str
    tensors: int  # matrices with theta
    stored_rank_min: int
    stored_rank_max: int
    ranks: dict[str, int]  # stored rank per matrix
    budget_bytes: int | None
    file_bytes: int
    diagonal_fallback: int  # residual-cov matrices without covariance, fitted with their diagonal
    theta_bytes: int
    base_bytes: int
    rho: float  # theta bytes / base bytes
    peak_rss_mb: float
    matrices: int  # matrices that could carry theta
    seconds: float

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def convert(input_path: str, output_path: str, opts: ConvertOptions) -> ConversionSummary:
    validate(opts)
    budget = budget_bytes(opts, Path(input_path).stat().st_size) if Path(input_path).is_file() else None
    return convert_budgets(input_path, [(output_path, budget)], opts)[0]


def convert_budgets(input_path: str, outputs: list[tuple[str, int | None]],
                    opts: ConvertOptions) -> list[ConversionSummary]:
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
    budgeted = any(budget is not None for _, budget in outputs)
    pricing = Pricing({n: model.shape(n) for n in names},
                      {n: theta_math.resolve_structure(opts.structure, model.shape(n)) for n in names}, opts.theta_type)
    factored = {n: min(opts.rank * RANK_SEARCH_FACTOR, RANK_SEARCH_CAP, min(model.shape(n))) if budgeted else opts.rank
                for n in names}
    pieces = factor_loop(model, ref, opts.source, stats, factored, "theta", opts.quiet)
    svd_seconds = time.perf_counter() - started

    summaries = []
    for output_path, budget in outputs:
        t0 = time.perf_counter()
        ranks = choose_ranks(pieces, pricing, opts.rank, budget, opts.max_matrices)
        all_factors = thetas(pieces, pricing, ranks)
        if not all_factors:
            raise UserError(f"the budget of {budget} bytes is too small for even one rank of one matrix")
        summary = _write(model, ref, output_path, all_factors, pricing, opts, budget, stats)
        summary.matrices = len(names)
        summary.seconds = svd_seconds + time.perf_counter() - t0
        summaries.append(summary)
    return summaries


def _write(model, ref, output_path, all_factors, pricing, opts, budget, stats) -> ConversionSummary:
    gamma = opts.resolved_gamma()
    meta = theta_meta(model, ref, all_factors, pricing, rank=opts.rank, gamma=gamma, source=opts.source,
                      structure=opts.structure, imatrix=opts.imatrix, covariance=opts.covariance, budget=budget)
    theta_bytes = write_nkat(output_path, model.architecture, all_factors, meta)
    file_bytes = Path(output_path).stat().st_size
    if budget is not None and file_bytes > budget:  # the allocation's byte count is wrong: a bug
        raise RuntimeError(f"{output_path}: {file_bytes} bytes, over the budget of {budget}")
    stored_ranks = [f.rank for f in all_factors]
    return ConversionSummary(
        output=str(output_path),
        model=str(model.path),
        reference=str(opts.reference) if opts.reference else None,
        source=opts.source,
        structure=opts.structure,
        theta_rank=opts.rank,
        theta_gamma=gamma,
        theta_type=opts.theta_type,
        tensors=len(all_factors),
        stored_rank_min=min(stored_ranks),
        stored_rank_max=max(stored_ranks),
        ranks={f.name: f.rank for f in all_factors},
        budget_bytes=budget,
        file_bytes=file_bytes,
        diagonal_fallback=len(stats.diagonal_only),
        theta_bytes=theta_bytes,
        base_bytes=model.file_size,
        rho=theta_bytes / model.file_size,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        matrices=0,
        seconds=0.0,
    )
