"""Allocation of bytes over tensors: each tensor's lower convex hull of (bytes, damage), then one
Lagrangian sweep that serves every budget.

Pure math (numpy only). A unit is one tensor, or tensors tied to one type (gate/up); its options
are types with exact bytes and predicted damage. Every upgrade step along every unit's hull is
sorted by damage removed per byte; a budget takes the longest prefix of that order that fits (a
point of the Lagrangian solution, optimal among all combinations at its bytes), then fills the
rest with the next steps that still fit, in the same order, and what is still left on any option
under a hull step that fits (spend_rest). Budgets are solved in increasing
order and a larger budget never keeps a worse answer than a smaller one, so predicted damage
never rises as the budget grows.

Options may also carry a time (seconds per generated token, measure.type_speed): sweep_within_time
finds, for one budget, the allocation whose summed time stays within a limit, by a second
Lagrange multiplier on time (bisected) over the same sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass
class Curve:
    """One unit's options: type names, exact bytes, predicted damage (lower is better)."""

    name: str
    options: list[str]
    bytes: np.ndarray
    damage: np.ndarray
    members: list[str] = field(default_factory=list)  # the tensors it stands for (default: [name])
    time: np.ndarray | None = None  # seconds per generated token of each option (default: all 0)

    def __post_init__(self):
        self.bytes = np.asarray(self.bytes, dtype=np.int64)
        self.damage = np.asarray(self.damage, dtype=np.float64)
        self.time = np.zeros(len(self.damage)) if self.time is None else np.asarray(self.time, dtype=np.float64)
        if not self.members:
            self.members = [self.name]
        if not (len(self.options) == len(self.bytes) == len(self.damage) == len(self.time)) or not self.options:
            raise ValueError(f"{self.name}: options, bytes, damage and time must be non-empty and of one length")


@dataclass
class Allocation:
    budget: int
    choice: dict[str, str]  # unit name -> type
    bytes: int  # fixed bytes + every unit's bytes
    damage: float
    time: float | None = None  # summed option time, where sweep_within_time solved it


def lower_hull(bytes_: np.ndarray, damage: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points, cheapest first, damage strictly falling."""
    order = sorted(range(len(bytes_)), key=lambda i: (int(bytes_[i]), float(damage[i]), i))
    front = []
    for i in order:  # Pareto: each kept point is cheaper-or-equal and strictly better than the last
        if front and bytes_[i] == bytes_[front[-1]]:
            continue
        if not front or damage[i] < damage[front[-1]]:
            front.append(i)
    hull: list[int] = []
    for i in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (float(bytes_[b]) - bytes_[a]) * (float(damage[i]) - damage[a]) \
                - (float(damage[b]) - damage[a]) * (float(bytes_[i]) - bytes_[a])
            if cross <= 0:  # b lies on or above the segment a -> i
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def tie(curves: list[Curve], groups: list[list[str]]) -> list[Curve]:
    """Units whose members share one type: each group of unit names becomes one unit over the
    types every member offers (bytes and damage summed)."""
    by_name = {c.name: c for c in curves}
    grouped = {n for g in groups for n in g}
    out = [c for c in curves if c.name not in grouped]
    for g in groups:
        parts = [by_name[n] for n in g]
        common = [t for t in parts[0].options if all(t in p.options for p in parts[1:])]
        if not common:
            raise ValueError(f"{' + '.join(g)}: no type fits all of them")
        idx = [[p.options.index(t) for t in common] for p in parts]
        out.append(Curve("+".join(g), common, sum(p.bytes[i] for p, i in zip(parts, idx)),
                         sum(p.damage[i] for p, i in zip(parts, idx)), [m for p in parts for m in p.members],
                         sum(p.time[i] for p, i in zip(parts, idx))))
    return out


def floor(curve: Curve, min_bytes: int) -> Curve:
    """The unit without the options cheaper than min_bytes (a guardrail for token_embd/output)."""
    keep = [i for i in range(len(curve.options)) if curve.bytes[i] >= min_bytes]
    if not keep:
        return curve
    return Curve(curve.name, [curve.options[i] for i in keep], curve.bytes[keep], curve.damage[keep], curve.members,
                 curve.time[keep])


def smallest_bytes(curves: list[Curve], fixed_bytes: int) -> int:
    return int(fixed_bytes + sum(int(c.bytes.min()) for c in curves))


def spend_rest(curves: list[Curve], idx: list[int], used: int, damage: float, budget: int) -> tuple[int, float]:
    """What the hull steps leave of the budget, spent on any option, on the hull or under it, that
    fits and lowers damage: the largest decrease first, until none fits. A hull step can be larger
    than what is left while an option under it fits (a small model's one big token_embd). `idx`
    (each unit's option index) is updated in place; returns the bytes used and the damage."""
    while True:
        best = None  # (damage removed, unit, option)
        for u, c in enumerate(curves):
            gain = c.damage[idx[u]] - c.damage
            ok = (c.bytes - c.bytes[idx[u]] <= budget - used) & (gain > 0)
            if ok.any():
                j = int(np.argmax(np.where(ok, gain, -np.inf)))
                if best is None or gain[j] > best[0]:
                    best = (float(gain[j]), u, j)
        if best is None:
            return used, damage
        gain, u, j = best
        used += int(curves[u].bytes[j] - curves[u].bytes[idx[u]])
        damage -= gain
        idx[u] = j


def sweep(curves: list[Curve], fixed_bytes: int, budgets: list[int]) -> list[Allocation | None]:
    """The allocation for each budget (None where even the cheapest options do not fit)."""
    hulls = [lower_hull(c.bytes, c.damage) for c in curves]
    steps = []  # (-damage removed per byte, unit, level reached)
    for u, (c, h) in enumerate(zip(curves, hulls)):
        for k in range(1, len(h)):
            db = int(c.bytes[h[k]] - c.bytes[h[k - 1]])
            dd = float(c.damage[h[k - 1]] - c.damage[h[k]])
            steps.append((-dd / db, u, k, db, dd))
    steps.sort()
    start_bytes = int(fixed_bytes + sum(int(c.bytes[h[0]]) for c, h in zip(curves, hulls)))
    start_damage = float(sum(c.damage[h[0]] for c, h in zip(curves, hulls)))

    results: dict[int, Allocation | None] = {}
    best: Allocation | None = None
    levels = [0] * len(curves)
    used, damage, pos = start_bytes, start_damage, 0
    for budget in sorted(set(int(b) for b in budgets)):
        if budget < start_bytes:
            results[budget] = None
            continue
        while pos < len(steps) and used + steps[pos][3] <= budget:  # the Lagrangian prefix
            _, u, k, db, dd = steps[pos]
            levels[u], used, damage, pos = k, used + db, damage - dd, pos + 1
        fill, f_used, f_damage = list(levels), used, damage
        for _, u, k, db, dd in steps[pos:]:  # then every later step that still fits, in order
            if fill[u] == k - 1 and f_used + db <= budget:
                fill[u], f_used, f_damage = k, f_used + db, f_damage - dd
        idx = [h[lv] for h, lv in zip(hulls, fill)]
        f_used, f_damage = spend_rest(curves, idx, f_used, f_damage, budget)
        here = Allocation(budget, {c.name: c.options[i] for c, i in zip(curves, idx)}, int(f_used), float(f_damage))
        if best is None or here.damage <= best.damage:
            best = here
        results[budget] = Allocation(budget, best.choice, best.bytes, best.damage)
    return [results[int(b)] for b in budgets]


def choice_totals(curves: list[Curve], choice: dict[str, str]) -> tuple[float, float]:
    """(damage, time) of one option per unit."""
    idx = [c.options.index(choice[c.name]) for c in curves]
    return (float(sum(c.damage[i] for c, i in zip(curves, idx))), float(sum(c.time[i] for c, i in zip(curves, idx))))


def sweep_within_time(curves: list[Curve], fixed_bytes: int, budget: int, max_time: float,
                      steps: int = 40) -> tuple[Allocation | None, bool]:
    """The allocation for one budget whose summed option time is at most max_time, and whether it
    is: each option's damage is raised by mu x its time, mu bisected (log scale) to the smallest
    that meets the limit. Where no mu does (the budget is too small for that speed), the fastest
    allocation found, and False. None where even the cheapest options do not fit."""

    def solve(mu: float) -> Allocation | None:
        shifted = [replace(c, damage=c.damage + mu * c.time) for c in curves]
        a = sweep(shifted, fixed_bytes, [budget])[0]
        if a is not None:
            a.damage, a.time = choice_totals(curves, a.choice)
        return a

    best = solve(0.0)
    if best is None or best.time <= max_time:
        return best, best is not None
    # a scale where mu x time is comparable to damage: the spread of each over the options
    spread_d = sum(float(np.ptp(c.damage)) for c in curves) or 1.0
    spread_t = sum(float(np.ptp(c.time)) for c in curves) or 1.0
    lo, hi = 0.0, spread_d / spread_t
    fast = solve(hi)
    while fast.time > max_time and hi < 1e12 * spread_d / spread_t:
        lo, hi = hi, hi * 10
        fast = solve(hi)
    if fast.time > max_time:
        return fast, False
    for _ in range(steps):
        mid = np.sqrt(lo * hi) if lo > 0 else hi / 10
        here = solve(mid)
        if here.time <= max_time:
            hi, fast = mid, here
        else:
            lo = mid
    return fast, True
