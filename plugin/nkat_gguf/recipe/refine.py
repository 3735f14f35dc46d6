"""Measured refinement of a budget's allocation with Optuna TPE (`nkat mix --refine N`).

The Lagrangian allocation is optimal for the weights it is given, and those weights are a model
fitted on a few probes. Refinement searches a small space around them: one offset per group
(each tensor role, each depth quarter) in {-1, 0, +1}, which multiplies that group's weights by
2**offset. A factor of two moves a group's tensors by about one step along their hulls, up or
down. Each trial solves the allocation again at the budget with the offset weights, so every
trial meets the budget by construction. It then writes the file with llama.cpp's quantizer and
measures its KLD against the reference on the calibration text (never the evaluation text).

The first trial is the unrefined allocation (all offsets 0). The best trial's recipe becomes the
budget's mix. A recipe measured once is not measured again. Trials live in an Optuna storage: an
SQLite file in the work dir, or any RDB URL, so several workers can share one study, as with
`nkat optimize`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..util.report import progress, say
from .allocate import Allocation
from .fit import QUARTERS, block_count, role_and_quarter

OFFSETS = (-1, 0, 1)
DB_NAME = "refine.db"
QUARTER = "quarter "  # a depth group's parameter name prefix


@dataclass
class Refinement:
    """What the search found for one budget."""

    trials: int  # complete trials in the study
    best_trial: int
    offsets: dict[str, int]  # group -> offset of the best trial (0s omitted)
    kld_before: float  # the unrefined allocation's KLD on the calibration text
    kld_after: float  # the best trial's
    kld_err_after: float
    chunks: int

    def to_dict(self) -> dict:
        return asdict(self)


def groups(names) -> list[str]:
    """The searched groups of these tensor names: their roles, then the depth quarters."""
    n_blocks = block_count(names)
    roles = dict.fromkeys(role_and_quarter(n, n_blocks)[0] for n in names)
    return list(roles) + [f"{QUARTER}{q}" for q in range(QUARTERS)]


def offset_weight(base: Callable[[str], float], offsets: dict[str, int], n_blocks: int) -> Callable[[str], float]:
    """base(name) x 2 ** (its role's offset + its depth quarter's offset)."""
    def weight(name: str) -> float:
        role, q = role_and_quarter(name, n_blocks)
        shift = offsets.get(role, 0) + (offsets.get(f"{QUARTER}{q}", 0) if q is not None else 0)
        return base(name) * 2.0 ** shift
    return weight


def study_name(recipe_key: str, target: int, settings: str) -> str:
    """One study per unrefined recipe, budget and scoring settings."""
    return f"mix-refine-{recipe_key}-{target}-{settings}"


def refine(builder, base_weight: Callable[[str], float] | None, target: int, *, trials: int,
           measure: Callable[[Path], dict], chunks: int, storage_url: str, settings: str, seed: int = 0,
           quiet: bool = False) -> tuple[Allocation, Refinement]:
    """The allocation at `target` whose measured KLD was lowest over `trials` trials (the first being
    the unrefined one), and the search's summary. measure(path) -> {"kld_mean", "kld_err"} on `chunks`
    chunks; every file but the best so far is deleted once measured. builder's weights are restored
    on return."""
    import optuna
    from optuna.trial import TrialState

    from ..util.study_storage import fail_dead_local, open_storage, worker_id

    base = base_weight or (lambda name: 1.0)
    names = list(builder.costs)
    n_blocks = block_count(names)
    space = groups(names)

    def allocation(offsets: dict[str, int]) -> Allocation:
        builder.set_weights(offset_weight(base, offsets, n_blocks))
        return builder.allocate([target])[0]

    start = allocation({})
    unrefined_key = builder.key(builder.types(start))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(n_startup_trials=min(5, max(2, trials // 3)), multivariate=True,
                                             seed=seed)
    name = study_name(unrefined_key, target, settings)
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                load_if_exists=True)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial({g: 0 for g in space}, user_attrs={"queued": "unrefined allocation"})
    me = worker_id()

    def completed():
        return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def measured() -> dict[str, dict]:
        """Recipe key -> the figures of the trial that measured it."""
        return {t.user_attrs["key"]: t.user_attrs for t in completed() if "key" in t.user_attrs}

    def objective(trial) -> float:
        trial.set_user_attr("worker", me)
        trial.set_user_attr("worker_trial", trial.number)
        offsets = {g: trial.suggest_categorical(g, list(OFFSETS)) for g in space}
        alloc = allocation(offsets)
        recipe = builder.types(alloc)  # trials score llama.cpp's rounding of the types
        key = builder.key(recipe)
        known = measured().get(key)
        if known is None:
            path = builder.write(recipe)
            known = dict(measure(path), key=key)
            best = min(completed(), key=lambda t: t.value, default=None)
            if best is None or known["kld_mean"] < best.value:  # keep only the best file on disk
                if best is not None:
                    builder.path(best.user_attrs["key"]).unlink(missing_ok=True)
            else:
                path.unlink(missing_ok=True)
        for k in ("key", "kld_mean", "kld_err"):
            trial.set_user_attr(k, known[k])
        trial.set_user_attr("bytes", alloc.bytes)
        return float(known["kld_mean"])

    bar = progress(total=trials, desc=f"refine {target / (1 << 20):.0f} MiB", quiet=quiet, unit="trial")
    try:
        while (done := len(completed())) < trials:
            bar.n = done
            bar.refresh()
            fail_dead_local(study, storage, me)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(objective, n_trials=1, gc_after_trial=False)
        bar.n = len(completed())
        bar.refresh()
    finally:
        bar.close()

    done = completed()
    first = min(done, key=lambda t: t.number)
    best = min(done, key=lambda t: (t.value, t.number))
    offsets = {g: int(v) for g, v in best.params.items()}
    chosen = allocation(offsets)
    builder.set_weights(base_weight)
    summary = Refinement(len(done), best.number, {g: v for g, v in offsets.items() if v},
                         float(first.value), float(best.value), float(best.user_attrs["kld_err"]), chunks)
    say(f"[mix] refined {target / (1 << 20):.1f} MiB: calibration KLD {summary.kld_before:.5f} -> "
        f"{summary.kld_after:.5f} (trial {best.number} of {len(done)})", quiet)
    return chosen, summary
