"""nkat convert: model (+ reference, + imatrix) -> theta per weight matrix -> .nkat file.

Tensor by tensor: each weight is dequantized, turned into factors and dropped before the next,
so memory holds one or two matrices in float32 plus the (small) factors.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import numpy as np

from . import theta as theta_math
from .errors import UserError
from .gguf_io import ModelFile
from .nkat_format import NkatMeta, ThetaFactors, factor_bytes, write_nkat
from .report import progress

DEFAULT_GAMMA = {"weight": 0.97, "residual": 2.0, "residual-act": 2.0}
# --optimize-rank searches ranks up to this multiple of --theta-rank (capped).
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
    layers: list[str] = field(default_factory=list)
    budget_mb: float | None = None  # set -> --optimize-rank
    quiet: bool = False

    def resolved_gamma(self) -> float:
        return DEFAULT_GAMMA[self.source] if self.gamma is None else float(self.gamma)


def validate(opts: ConvertOptions) -> None:
    if opts.source not in theta_math.SOURCES:
        raise UserError(f"--source must be one of {', '.join(theta_math.SOURCES)}, not {opts.source!r}")
    if opts.source != "weight" and not opts.reference:
        raise UserError(f"--source {opts.source} needs --reference REF.gguf (a higher-precision copy of the model)")
    if opts.source == "residual-act" and not opts.imatrix:
        raise UserError("--source residual-act needs --imatrix FILE (make one with nkat calibrate)")
    gamma = opts.resolved_gamma()
    if not np.isfinite(gamma) or gamma == 0:
        raise UserError(f"--theta-gamma must be finite and non-zero, not {opts.gamma}")
    if opts.rank <= 0:
        raise UserError(f"--theta-rank must be positive, not {opts.rank}")
    if opts.budget_mb is not None and opts.budget_mb <= 0:
        raise UserError(f"--budget-mb must be positive, not {opts.budget_mb}")


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
    from .calibration import column_scales, read_imatrix

    stats = read_imatrix(path)
    missing = [n for n in names if n not in stats]
    if missing:
        raise UserError(f"{path}: no activation statistics for {missing[0]} ({len(missing)} tensors missing)")
    return {n: column_scales(*stats[n]) for n in names}


def correction_pq(model: ModelFile, ref: ModelFile | None, name: str, source: str, rank: int,
                  col_scale: np.ndarray | None = None):
    """P, Q with E ~ P Q^T at `rank` for one tensor, E being what `source` corrects."""
    W = model.dequantize(name)
    E = theta_math.correction_matrix(source, W, ref.dequantize(name) if ref else None)
    del W
    return theta_math.low_rank(E, rank, col_scale)


def truncated_theta(name: str, P: np.ndarray, Q: np.ndarray, rank: int, structure: str) -> ThetaFactors:
    """The theta of the first `rank` components of P, Q in a resolved structure."""
    B, A = theta_math.structure_factors(P[:, :rank], Q[:, :rank], structure)
    return ThetaFactors(name, A, B)


def _matrix_factors(model, ref, name, opts, scales, rank):
    """P, Q (E ~ P Q^T) for one tensor at `rank`, and its resolved structure (checked first)."""
    shape = model.shape(name)
    structure = theta_math.resolve_structure(opts.structure, shape)
    theta_math.check_rank(rank, shape, name)
    P, Q = correction_pq(model, ref, name, opts.source, rank, scales.get(name))
    return P, Q, structure


def allocate_ranks(gains: dict[str, np.ndarray], costs: dict[str, float], budget_bytes: float) -> dict[str, int]:
    """Greedy: take rank components in order of captured energy per byte until the budget is spent.

    Within a matrix the gains (squared singular values) fall, so the global order by
    gain/cost is a valid prefix order for every matrix.
    """
    order = sorted(
        ((g / costs[name], name) for name, gs in gains.items() for g in gs), reverse=True
    )
    ranks = {name: 0 for name in gains}
    spent = 0.0
    for _, name in order:
        if spent + costs[name] > budget_bytes:
            continue
        ranks[name] += 1
        spent += costs[name]
    return ranks


def convert(input_path: str, output_path: str, opts: ConvertOptions) -> dict:
    return convert_budgets(input_path, [(output_path, opts.budget_mb)], opts)[0]


def convert_budgets(input_path: str, outputs: list[tuple[str, float | None]], opts: ConvertOptions) -> list[dict]:
    """Several .nkat files from one pass of SVDs: each (output, budget MiB or None for uniform rank).

    The factors are computed once at the largest rank any output needs; each output truncates them.
    """
    for _, budget in outputs:
        validate(ConvertOptions(**{**opts.__dict__, "budget_mb": budget}))
    started = time.perf_counter()
    model = ModelFile(input_path)
    if model.file_type == "adapter":
        raise UserError(f"{input_path}: is an adapter, not a model")
    names = model.target_names(opts.layers or None)
    ref = open_reference(model, opts.reference, names) if opts.source != "weight" else None
    scales = load_scales(opts.imatrix, names) if opts.source == "residual-act" else {}
    gamma = opts.resolved_gamma()

    budgeted = any(budget is not None for _, budget in outputs)
    search_rank = min(opts.rank * RANK_SEARCH_FACTOR, RANK_SEARCH_CAP) if budgeted else opts.rank

    pieces = {}
    for name in progress(names, desc="theta", quiet=opts.quiet, unit="tensor"):
        rank = min(search_rank, min(model.shape(name))) if budgeted else opts.rank
        pieces[name] = _matrix_factors(model, ref, name, opts, scales, rank)
    svd_seconds = time.perf_counter() - started

    summaries = []
    for output_path, budget_mb in outputs:
        t0 = time.perf_counter()
        if budget_mb is not None:
            ranks = _budget_ranks(model, pieces, opts.theta_type, budget_mb)
        else:
            ranks = {name: opts.rank for name in names}
        all_factors = [truncated_theta(name, *pieces[name][:2], ranks[name], pieces[name][2])
                       for name in names if ranks[name] > 0]
        if not all_factors:
            raise UserError(f"--budget-mb {budget_mb} is too small for even one rank of one matrix")
        summaries.append(_write(model, ref, output_path, all_factors, opts, gamma, budget_mb,
                                svd_seconds + time.perf_counter() - t0))
    return summaries


def _write(model, ref, output_path, all_factors, opts, gamma, budget_mb, seconds) -> dict:
    structures = {theta_math.resolve_structure(opts.structure, model.shape(f.name)) for f in all_factors}
    meta = NkatMeta(
        theta_rank=opts.rank,
        theta_gamma=gamma,
        source=opts.source,
        structure=opts.structure if len(structures) > 1 or opts.structure != "auto" else structures.pop(),
        theta_type=opts.theta_type,
        base=model.identity(),
        reference=ref.identity() if ref else None,
        imatrix=str(opts.imatrix or ""),
        extra={"rank_allocation": "budget" if budget_mb is not None else "uniform"},
    )
    theta_bytes = write_nkat(output_path, model.architecture, all_factors, meta)
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
        "budget_mb": budget_mb,
        "tensors": len(all_factors),
        "stored_rank_min": min(stored_ranks),
        "stored_rank_max": max(stored_ranks),
        "theta_bytes": theta_bytes,
        "base_bytes": model.file_size,
        "rho": theta_bytes / model.file_size,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _budget_ranks(model, pieces, theta_type: str, budget_mb: float) -> dict[str, int]:
    gains, costs = {}, {}
    for name, (P, Q, structure) in pieces.items():
        n_out, n_in = model.shape(name)
        per_component = 2 if structure == "antisymmetric" else 1
        # Bytes of one rank at the worst storage (lora_b falls back to F16 off multiples of 32),
        # so the file never exceeds the budget.
        costs[name] = per_component * factor_bytes(n_out, n_in, 1, theta_type)
        gains[name] = (P.astype(np.float64) ** 2).sum(axis=0)  # = S_k^2 of the (scaled) SVD
    return allocate_ranks(gains, costs, budget_mb * 1024 * 1024)
