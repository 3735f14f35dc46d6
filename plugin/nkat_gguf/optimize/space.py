"""The search space of nkat optimize, what a trial samples from it, and the trial queued first.

Source (those the inputs allow), structure, size (the bytes of a uniform rank R), allocation of
those bytes (uniform rank R, or the global greedy cut by singular value^2 per byte of
theta.allocate_ranks), gamma (each source's range from theta.SOURCE_TABLE), and which tensor
groups (the block roles attention q/k/v/output, ffn gate/up/down) carry theta.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..formats.roles import BLOCK_ROLES, block_role
from ..theta import lowrank as theta_math
from ..theta.pipeline import Allocation

# Tensor groups that may carry theta: the block roles (formats/roles.py), in gguf's spelling.
GROUPS = BLOCK_ROLES
STRUCTURE_CHOICES = ("general", "auto")  # auto = antisymmetric (the NKAT form) where square
RANK_LOW, RANK_HIGH, RANK_STEP = 8, 64, 8
ALLOCATIONS = tuple(a.value for a in Allocation)  # plain strings for Optuna; budget: the file bytes of uniform rank R, ranks by the greedy cut
THETA_TYPE = "q8_0"


def group_of(name: str) -> str | None:
    return block_role(name)


def gamma_param(source: str) -> str:
    """The Optuna parameter of a source's gamma: the residual sources share one (same range)."""
    return "gamma" if theta_math.source_info(source).needs_reference else "gamma_weight"


@dataclass
class SearchSpace:
    sources: list[str]
    groups: list[str]
    structures: list[str] = field(default_factory=lambda: list(STRUCTURE_CHOICES))
    rank: dict = field(default_factory=lambda: {"low": RANK_LOW, "high": RANK_HIGH, "step": RANK_STEP})
    gamma: dict = field(default_factory=dict)
    allocations: list[str] = field(default_factory=lambda: list(ALLOCATIONS))
    theta_type: str = THETA_TYPE

    def __post_init__(self):
        for source in self.sources:
            self.gamma.setdefault(source, list(theta_math.source_info(source).gamma_range))

    @classmethod
    def for_inputs(cls, has_reference: bool, has_imatrix: bool, groups: list[str], target_rank: int | None,
                   has_covariance: bool = False):
        """The sources of theta.SOURCE_TABLE that these inputs make possible, in table order."""
        have = {None: True, "diagonal": has_imatrix, "covariance": has_covariance}
        sources = [s.name for s in theta_math.SOURCE_TABLE.values()
                   if (has_reference or not s.needs_reference) and have[s.statistics]]
        space = cls(sources=sources, groups=groups)
        if target_rank is not None:
            space.rank = {"fixed": int(target_rank)}
        return space

    @property
    def max_rank(self) -> int:
        return self.rank.get("fixed") or self.rank["high"]

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "groups": list(self.groups), "structures": list(self.structures),
                "rank": dict(self.rank), "gamma": {k: list(v) for k, v in self.gamma.items()},
                "allocations": list(self.allocations), "theta_type": self.theta_type}

    def suggest(self, trial) -> dict:
        """Sample one configuration; returns the resolved parameters."""
        source = trial.suggest_categorical("source", self.sources)
        structure = trial.suggest_categorical("structure", self.structures)
        if "fixed" in self.rank:
            rank = self.rank["fixed"]
        else:
            rank = trial.suggest_int("rank", self.rank["low"], self.rank["high"], step=self.rank["step"])
        allocation = trial.suggest_categorical("allocation", self.allocations)
        low, high = self.gamma[source]
        gamma = trial.suggest_float(gamma_param(source), low, high)
        groups = [g for g in self.groups if trial.suggest_categorical(g, [True, False])]
        return {"source": source, "structure": structure, "rank": int(rank), "gamma": float(gamma),
                "groups": groups, "allocation": allocation}

    def default_params(self) -> dict:
        """The trial queued first in a new study, a plain convert: the most informed source the inputs
        allow, general structure, uniform ranks near 32, the source's default gamma (2 for the residual
        sources: theta = E itself), theta on every group."""
        # The table's last possible, the most informed: residual-cov > residual-act > residual > weight
        # (README: at rank 8 on the demo pair, residual-cov recovered 56 % of the gap, residual-act 22 %).
        source = self.sources[-1]
        params = {"source": source, "structure": "general", "allocation": Allocation.UNIFORM.value,
                  gamma_param(source): theta_math.source_info(source).default_gamma}
        if "fixed" not in self.rank:
            lo, hi, step = self.rank["low"], self.rank["high"], self.rank["step"]
            params["rank"] = min(hi, max(lo, lo + step * round((32 - lo) / step)))
        params.update({g: True for g in self.groups})
        return params


def search_space_note(space: SearchSpace) -> str:
    """What a study without --reference can search, and what that source was measured to do."""
    low, high = space.gamma["weight"]
    return (f"no --reference: only the weight source is searchable (SVD of W itself, gamma {low:g}..{high:g}); "
            f"{theta_math.WEIGHT_SOURCE_EFFECT}. Pass --reference REF.gguf to search the residual sources")

