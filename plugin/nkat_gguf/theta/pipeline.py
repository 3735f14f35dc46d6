"""The theta pipeline, once, for nkat convert (theta/convert.py) and nkat optimize's trials:

  Statistics (what a source weights the residual with, per tensor)
  -> factor_loop (P, Q with E ~ P Q^T per matrix: one SVD each, at the largest rank wanted)
  -> choose_ranks (uniform, or the greedy cut priced in the file's real bytes: Pricing)
  -> thetas (each matrix's first components in its structure) and theta_meta (its NkatMeta)
  -> formats.nkat_format.write_nkat.

Every matrix is dequantized, factored and dropped before the next, so memory holds one or two
matrices in float32 plus the (small) factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import lowrank as theta_math
from .lowrank import StatisticsKind
from ..errors import BadSetting, Setting, UserError
from ..formats.gguf_io import ModelFile
from ..formats.keys import NkatKeys
from ..formats.nkat_format import NkatMeta, ThetaFactors, factor_bytes
from ..util.enums import StrEnum
from ..util.report import progress

# Bytes a matrix's two tensors add to the file besides their data: GGUF tensor info (name
# string, dims, type, offset) and up to 31 bytes of alignment padding each.
TENSOR_OVERHEAD = 2 * (8 + 4 + 2 * 8 + 4 + 8 + 31)
# Header and metadata of a .nkat without tensors, with room for long paths in nkat.*.
FILE_OVERHEAD = 8192
_TENSOR_SUFFIXES = ".lora_a.lora_b"  # the two tensors' names: the weight's name + each suffix


class Allocation(StrEnum):
    """How the ranks are chosen: one rank everywhere, the greedy cut within a byte budget, or
    nkat mix's allocation (ranks priced against type changes)."""

    UNIFORM = "uniform"
    BUDGET = "budget"
    MIX = "mix"


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
        self.cov = CovarianceFile(covariance) if kind == StatisticsKind.COVARIANCE and covariance else None
        self.diagonal_only = [n for n in names
                              if kind == StatisticsKind.COVARIANCE and (self.cov is None or n not in self.cov)]
        wants_scales = names if kind == StatisticsKind.DIAGONAL else self.diagonal_only
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


def factor(E: np.ndarray, name: str, stats: Statistics, rank: int):
    """P, Q with E ~ P Q^T at `rank`, weighted as `stats` weighs `name` (column scales, or the exact
    whitened solution with its covariance root); P = U S of the weighted SVD, so component_gains(P)
    is the error each component removes."""
    cov_root = stats.root(name)
    if cov_root is None:
        return theta_math.low_rank(E, rank, stats.scales.get(name))
    P, Q, _ = theta_math.whitened_low_rank(E, cov_root, rank)
    return P, Q


def correction_pq(model: ModelFile, ref: ModelFile | None, name: str, source: str, rank: int, stats: Statistics):
    """P, Q with E ~ P Q^T at `rank` for one tensor, E being what `source` corrects (factor)."""
    stats.root(name)  # a bad covariance is its own error, not this matrix's (the root is cached for factor)
    W = model.dequantize(name)
    E = theta_math.correction_matrix(source, W, ref.dequantize(name) if ref else None)
    del W
    try:
        return factor(E, name, stats, rank)
    except UserError as exc:
        raise UserError(f"{model.path.name}: {name}: {exc}") from None


def factor_loop(model: ModelFile, ref: ModelFile | None, source: str, stats: Statistics, ranks: dict[str, int],
                desc: str, quiet: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """P, Q (E ~ P Q^T) of every matrix of `ranks` at its rank there (checked first)."""
    pieces = {}
    for name in progress(list(ranks), desc=desc, quiet=quiet, unit="tensor"):
        theta_math.check_rank(ranks[name], model.shape(name), name)
        pieces[name] = correction_pq(model, ref, name, source, ranks[name], stats)
    return pieces


def truncated_theta(name: str, P: np.ndarray, Q: np.ndarray, rank: int, structure: str) -> ThetaFactors:
    """The theta of the first `rank` components of P, Q in a resolved structure."""
    B, A = theta_math.structure_factors(P[:, :rank], Q[:, :rank], structure)
    return ThetaFactors(name, A, B)


@dataclass(frozen=True)
class Pricing:
    """What a choice of ranks costs in the .nkat file, matrix by matrix (resolved structures)."""

    shapes: dict[str, tuple[int, int]]
    structures: dict[str, str]
    theta_type: str

    def stored_rank(self, name: str, rank: int) -> int:
        """The factors' inner size: an antisymmetric theta stores 2 rank (B = 0.5 [P, -Q])."""
        return 2 * rank if self.structures[name] == "antisymmetric" else rank

    def component_bytes(self, name: str) -> int:
        """One more component at the worst storage (lora_b falls back to F16 at ranks not a
        multiple of 32): what the greedy cut prices, so that it never overspends."""
        return factor_bytes(*self.shapes[name], self.stored_rank(name, 1), self.theta_type)

    def first_bytes(self, name: str) -> int:
        """What a matrix's first component costs on top: its two tensors' names and infos."""
        return TENSOR_OVERHEAD + 2 * len(name) + len(_TENSOR_SUFFIXES)

    def theta_bytes(self, ranks: dict[str, int]) -> int:
        """The factors' data, exactly as write_nkat counts it."""
        return sum(factor_bytes(*self.shapes[n], self.stored_rank(n, r), self.theta_type) for n, r in ranks.items() if r)

    def file_bytes(self, ranks: dict[str, int]) -> int:
        """An upper bound of the file's size (FILE_OVERHEAD and the tensor infos are bounds)."""
        return FILE_OVERHEAD + self.theta_bytes(ranks) + sum(self.first_bytes(n) for n, r in ranks.items() if r)


def component_gains(P: np.ndarray) -> np.ndarray:
    """S_k^2 of the SVD (P = U S): for residual-cov the output error each component removes."""
    return (P.astype(np.float64) ** 2).sum(axis=0)


def budget_ranks(pieces: dict[str, tuple[np.ndarray, np.ndarray]], pricing: Pricing, budget: int,
                 max_matrices: int | None = None) -> dict[str, int]:
    """Every matrix's rank by the greedy cut, spending as much of `budget` as the real file sizes allow.

    The cut prices one rank at the worst storage (Pricing.component_bytes), which never overspends
    but leaves up to half of lora_b's bytes unused at Q8_0 ranks. So the cut is rerun with a larger
    nominal budget, bisected, as long as the file it gives (priced exactly) still fits: the cut is
    monotone in the budget, so this keeps its order."""
    gains = {n: component_gains(P) for n, (P, _) in pieces.items()}
    costs = {n: pricing.component_bytes(n) for n in pieces}
    first = {n: pricing.first_bytes(n) for n in pieces}

    def cut(nominal: float) -> dict[str, int]:
        return theta_math.allocate_ranks(gains, costs, nominal - FILE_OVERHEAD, first, max_matrices)

    best, low, high = cut(budget), float(budget), 2.0 * budget
    for _ in range(16):
        mid = (low + high) / 2
        ranks = cut(mid)
        if pricing.file_bytes(ranks) <= budget:
            best, low = ranks, mid
        else:
            high = mid
    return best


def choose_ranks(pieces: dict[str, tuple[np.ndarray, np.ndarray]], pricing: Pricing, rank: int,
                 budget: int | None = None, max_matrices: int | None = None) -> dict[str, int]:
    """`rank` everywhere (at most what was factored), or with a budget the greedy cut."""
    if budget is not None:
        return budget_ranks(pieces, pricing, budget, max_matrices)
    return {n: min(rank, P.shape[1]) for n, (P, _) in pieces.items()}


def thetas(pieces: dict[str, tuple[np.ndarray, np.ndarray]], pricing: Pricing,
           ranks: dict[str, int]) -> list[ThetaFactors]:
    """The thetas of the matrices with a rank, in the order of `pieces`."""
    return [truncated_theta(n, *pieces[n], ranks[n], pricing.structures[n]) for n in pieces if ranks.get(n)]


def theta_meta(model: ModelFile, ref: ModelFile | None, factors: list[ThetaFactors], pricing: Pricing, *,
               rank: int, gamma: float, source: str, structure: str, imatrix: str | None,
               covariance: str | None, budget: int | None, extra: dict | None = None,
               allocation: Allocation | None = None) -> NkatMeta:
    """The metadata of a .nkat of `factors`: the structure asked for, or the one `auto` resolved
    to where it resolved to one; the allocation, the covariance file and the budget in extra."""
    used = {pricing.structures[f.name] for f in factors}
    keys = NkatKeys.Extra
    info = {keys.RANK_ALLOCATION: allocation or (Allocation.BUDGET if budget is not None else Allocation.UNIFORM)}
    if covariance:
        info[keys.COVARIANCE] = str(covariance)
    if budget is not None:
        info[keys.BUDGET_BYTES] = budget
    return NkatMeta(
        theta_rank=rank,
        theta_gamma=gamma,
        source=source,
        structure=structure if len(used) != 1 or structure != "auto" else used.pop(),
        theta_type=pricing.theta_type,
        base=model.identity(),
        reference=ref.identity() if ref else None,
        imatrix=str(imatrix or ""),
        extra=info | (extra or {}),
    )
