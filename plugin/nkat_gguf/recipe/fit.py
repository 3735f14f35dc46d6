"""From output error to KLD: a weight per tensor role and per depth quarter, fitted on probes.

The cost curves measure each tensor's relative output error; how much of it reaches the model's
KL-divergence depends on where the tensor sits. So a few probes are measured: a probe is the
reference with one group's tensors quantized to a probe type by llama.cpp (every other tensor
copied as stored), scored against the reference on the calibration text (never the evaluation
text). The model is

    KLD(file) ~ sum over tensors t of  role_weight[role(t)] * depth_weight[quarter(t)] * rel_damage_t

fitted on marginal probes (each role over all blocks, each depth quarter over all roles; plus
token_embd and output alone) by alternating scaling. Single role x quarter probes are held out of
the fit, and the report gives how well the model ranks them (Spearman) and its ratio to measured.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from ..formats.roles import GATE_UP_ROLES
from .costs import TensorCost

PROBE_TYPES = ("Q3_K", "Q4_0")  # the first a tensor can take (Q3_K needs rows of 256)
QUARTERS = 4
GATE_UP = "+".join(GATE_UP_ROLES)  # tied in the allocation, probed together
_BLOCK = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_]+)\.weight$")
# Held-out single groups: (role, quarter), spread over roles and depths.
HELD_OUT = (("attn_q", 0), ("attn_k", 1), ("attn_v", 2), ("attn_output", 3), (GATE_UP, 0), ("ffn_down", 1),
            ("attn_v", 0), ("ffn_down", 3))


def role_and_quarter(name: str, n_blocks: int) -> tuple[str, int | None]:
    """blk.5.ffn_up.weight -> ('ffn_gate+ffn_up', quarter of block 5); output.weight -> ('output', None)."""
    m = _BLOCK.match(name)
    if not m:
        return name.removesuffix(".weight"), None
    role = GATE_UP if m.group(2) in GATE_UP_ROLES else m.group(2)
    return role, min(QUARTERS - 1, int(m.group(1)) * QUARTERS // max(n_blocks, 1))


def block_count(names) -> int:
    """Blocks of the model whose tensor names these are (1 + the highest blk.N)."""
    return 1 + max((int(m.group(1)) for n in names if (m := _BLOCK.match(n))), default=-1)


def probe_type(cost: TensorCost) -> str | None:
    return next((t for t in PROBE_TYPES if t in cost.options), None)


@dataclass
class Probe:
    name: str  # 'role attn_v', 'quarter 2', 'output', 'held attn_v q2'
    members: list[str]
    held_out: bool = False
    rel_damage: dict[str, float] = field(default_factory=dict)  # member -> relative damage at its probe type
    kld: float | None = None  # measured
    kld_err: float | None = None
    predicted: float | None = None


def probes(costs: dict[str, TensorCost]) -> list[Probe]:
    """The probes for these tensors: marginal (fitted) and single role x quarter (held out)."""
    n_blocks = block_count(costs)
    where = {n: role_and_quarter(n, n_blocks) for n in costs if probe_type(costs[n])}
    roles = list(dict.fromkeys(r for r, _ in where.values()))
    out = [Probe(f"role {r}" if any(q is not None for rr, q in where.values() if rr == r) else r,
                 [n for n, (rr, _) in where.items() if rr == r]) for r in roles]
    out += [Probe(f"quarter {q}", [n for n, (_, qq) in where.items() if qq == q]) for q in range(QUARTERS)]
    out += [Probe(f"held {r} q{q}", [n for n, w in where.items() if w == (r, q)], held_out=True) for r, q in HELD_OUT]
    out = [p for p in out if p.members]
    for p in out:
        p.rel_damage = {n: costs[n].relative(probe_type(costs[n])) for n in p.members}
    return out


def probe_recipe(probe: Probe, costs: dict[str, TensorCost], reference_types: dict[str, str]) -> dict[str, str]:
    """The reference's own types (copied by llama.cpp as stored), the probe's members at their probe type."""
    return {n: probe_type(costs[n]) if n in probe.members else reference_types[n] for n in costs}


@dataclass
class Fit:
    role_weight: dict[str, float]
    depth_weight: list[float]
    n_blocks: int
    probes: list[Probe]
    spearman_held_out: float | None
    held_out_ratio: list[float]  # predicted / measured, each held-out probe

    def weight(self, name: str) -> float:
        role, q = role_and_quarter(name, self.n_blocks)
        a = self.role_weight.get(role, float(np.median(list(self.role_weight.values()))))
        return a * (self.depth_weight[q] if q is not None else 1.0)

    def predict(self, rel_damage: dict[str, float]) -> float:
        return float(sum(self.weight(n) * d for n, d in rel_damage.items()))

    def to_dict(self) -> dict:
        return {"role_weight": self.role_weight, "depth_weight": self.depth_weight,
                "spearman_held_out": self.spearman_held_out, "held_out_ratio": self.held_out_ratio,
                "probes": [asdict(p) | {"members": len(p.members)} for p in self.probes]}


def spearman(a, b) -> float | None:
    if len(a) < 3:
        return None
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def fit(measured: list[Probe], costs: dict[str, TensorCost], iterations: int = 200) -> Fit:
    """Role and depth weights from the measured marginal probes (alternating scaling: each role
    weight makes its role probe exact given the depth weights, each depth weight its quarter probe
    given the role weights, the quarter probes rescaled to the role probes' total so both sets
    can hold at once); then the held-out probes predicted and compared."""
    n_blocks = block_count(costs)
    where = {n: role_and_quarter(n, n_blocks) for p in measured for n in p.members}
    role_probes = {p.name.removeprefix("role "): p for p in measured if not p.held_out and not p.name.startswith("quarter")}
    quarter_probes = {int(p.name.split()[1]): p for p in measured if p.name.startswith("quarter ")}
    block_roles = [r for r in role_probes if any(where[n][1] is not None for n in role_probes[r].members)]
    a = {r: 1.0 for r in role_probes}
    b = np.ones(QUARTERS)

    def d(r, q):  # relative damage of role r in quarter q at the probe types
        p = role_probes[r]
        return sum(v for n, v in p.rel_damage.items() if where[n][1] == q)

    blocks_total = sum(max(role_probes[r].kld, 0.0) for r in block_roles)
    quarters_total = sum(max(p.kld, 0.0) for p in quarter_probes.values())
    rescale = blocks_total / quarters_total if quarters_total > 0 else 1.0
    for _ in range(iterations):
        for r, p in role_probes.items():
            denom = sum(b[q] * d(r, q) for q in range(QUARTERS)) if r in block_roles else sum(p.rel_damage.values())
            a[r] = max(p.kld, 0.0) / denom if denom > 0 else 0.0
        for q, p in quarter_probes.items():
            denom = sum(a[r] * d(r, q) for r in block_roles)
            if denom > 0:
                b[q] = rescale * max(p.kld, 0.0) / denom
        if b.mean() > 0:  # role x depth has one free scale: keep the mean depth weight at 1
            s = b.mean()
            b /= s
            for r in block_roles:
                a[r] *= s
    result = Fit({r: float(v) for r, v in a.items()}, [float(x) for x in b], n_blocks, measured, None, [])
    for p in measured:
        p.predicted = result.predict(p.rel_damage)
    held = [p for p in measured if p.held_out and p.kld is not None]
    result.spearman_held_out = spearman([p.predicted for p in held], [p.kld for p in held])
    result.held_out_ratio = [p.predicted / p.kld if p.kld and p.kld > 0 else float("nan") for p in held]
    return result
