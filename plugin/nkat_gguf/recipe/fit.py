"""From output error to KLD: a weight per tensor role and per depth quarter, fitted on probes.

The cost curves measure each tensor's relative output error; how much of it reaches the model's
KL-divergence depends on where the tensor sits. So a few probes are measured: a probe is the
reference with one group's tensors quantized to a probe type by llama.cpp (every other tensor
copied as stored), scored against the reference on the calibration text (never the evaluation
text). The model is

    KLD(file) ~ sum over tensors t of  role_weight[role(t)] * depth_weight[quarter(t)] * rel_damage_t

fitted on marginal probes (each role over all blocks, each depth quarter over all roles; plus
token_embd and output alone) by alternating scaling. On request (`nkat mix --fit-check`), single
role x quarter probes are held out of the fit, and the report gives how well the model ranks them
(Spearman) and its ratio to measured: a check of the model, not needed to make a file.

Outliers get a probe of their own. In some blocks (Qwen2.5-1.5B's ffn_down of blocks 1, 2 and 26)
a few huge activations dominate a tensor's output energy (110-375x its role's median), so its
relative error is tiny (0.000-0.002 at Q2_K, against the role's 0.058) while the error on the rest
of its output is not. Relative error under-rates such a tensor, and the allocator gave it Q2_K.
A block tensor whose relative damage at its probe type is below OUTLIER_SHARE of its role's
median is probed alone; its weight is its own measured KLD per unit of relative damage, and the
marginal probes are fitted on what their other members leave (their KLD minus the outliers').
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from ..formats.roles import GATE_UP_ROLES
from .costs import TensorCost

DEFAULT_CHUNKS = 3  # calibration chunks per probe (`--fit-chunks`); 4 gave files as good (docs/RESULTS.md)
PROBE_TYPES = ("Q3_K", "Q4_0")  # the first a tensor can take (Q3_K needs rows of 256)
OUTLIER_SHARE = 0.25  # relative damage below this share of the role's median: probed alone
TENSOR_PROBE = "tensor "  # the name prefix of an outlier's own probe
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


def outliers(costs: dict[str, TensorCost]) -> list[str]:
    """Block tensors whose relative damage at their probe type is below OUTLIER_SHARE of their
    role's median (see the module doc), in file order."""
    n_blocks = block_count(costs)
    rel = {n: c.relative(probe_type(c)) for n, c in costs.items() if probe_type(c)}
    role, by_role = {}, {}  # block tensors' roles; each role's relative damages
    for n, d in rel.items():
        r, q = role_and_quarter(n, n_blocks)
        if q is not None:
            role[n] = r
            by_role.setdefault(r, []).append(d)
    median = {r: float(np.median(v)) for r, v in by_role.items() if len(v) >= 4}
    return [n for n, r in role.items() if r in median and rel[n] < OUTLIER_SHARE * median[r]]


def probes(costs: dict[str, TensorCost], held_out: bool = True) -> list[Probe]:
    """The probes for these tensors: marginal (fitted), one per outlier tensor (fitted, its own
    weight) and, with held_out, single role x quarter (held out: they check the fit, not feed it)."""
    n_blocks = block_count(costs)
    where = {n: role_and_quarter(n, n_blocks) for n in costs if probe_type(costs[n])}
    roles = list(dict.fromkeys(r for r, _ in where.values()))
    out = [Probe(f"role {r}" if any(q is not None for rr, q in where.values() if rr == r) else r,
                 [n for n, (rr, _) in where.items() if rr == r]) for r in roles]
    out += [Probe(f"quarter {q}", [n for n, (_, qq) in where.items() if qq == q]) for q in range(QUARTERS)]
    out += [Probe(f"{TENSOR_PROBE}{n.removesuffix('.weight')}", [n]) for n in outliers(costs)]
    if held_out:
        out += [Probe(f"held {r} q{q}", [n for n, w in where.items() if w == (r, q)], held_out=True)
                for r, q in HELD_OUT]
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
    tensor_weight: dict[str, float] = field(default_factory=dict)  # outliers: their own probe's weight

    def weight(self, name: str) -> float:
        if name in self.tensor_weight:
            return self.tensor_weight[name]
        role, q = role_and_quarter(name, self.n_blocks)
        a = self.role_weight.get(role, float(np.median(list(self.role_weight.values()))))
        return a * (self.depth_weight[q] if q is not None else 1.0)

    def predict(self, rel_damage: dict[str, float]) -> float:
        return float(sum(self.weight(n) * d for n, d in rel_damage.items()))

    def to_dict(self) -> dict:
        return {"role_weight": self.role_weight, "depth_weight": self.depth_weight, "tensor_weight": self.tensor_weight,
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
    own = {p.members[0]: p for p in measured if p.name.startswith(TENSOR_PROBE)}
    tensor_weight = {n: max(p.kld, 0.0) / p.rel_damage[n] if p.rel_damage[n] > 0 else 0.0 for n, p in own.items()}
    role_probes = {p.name.removeprefix("role "): p for p in measured
                   if not p.held_out and not p.name.startswith(("quarter ", TENSOR_PROBE))}
    quarter_probes = {int(p.name.split()[1]): p for p in measured if p.name.startswith("quarter ")}
    block_roles = [r for r in role_probes if any(where[n][1] is not None for n in role_probes[r].members)]
    a = {r: 1.0 for r in role_probes}
    b = np.ones(QUARTERS)

    def d(r, q):  # relative damage of role r's non-outliers in quarter q at the probe types
        p = role_probes[r]
        return sum(v for n, v in p.rel_damage.items() if where[n][1] == q and n not in own)

    def rest(p):  # a marginal probe's KLD less its outliers' own (measured alone)
        return max(p.kld - sum(max(own[n].kld, 0.0) for n in p.members if n in own), 0.0)

    blocks_total = sum(rest(role_probes[r]) for r in block_roles)
    quarters_total = sum(rest(p) for p in quarter_probes.values())
    rescale = blocks_total / quarters_total if quarters_total > 0 else 1.0
    for _ in range(iterations):
        for r, p in role_probes.items():
            denom = sum(b[q] * d(r, q) for q in range(QUARTERS)) if r in block_roles else sum(p.rel_damage.values())
            a[r] = rest(p) / denom if denom > 0 else 0.0
        for q, p in quarter_probes.items():
            denom = sum(a[r] * d(r, q) for r in block_roles)
            if denom > 0:
                b[q] = rescale * rest(p) / denom
        if b.mean() > 0:  # role x depth has one free scale: keep the mean depth weight at 1
            s = b.mean()
            b /= s
            for r in block_roles:
                a[r] *= s
    result = Fit({r: float(v) for r, v in a.items()}, [float(x) for x in b], n_blocks, measured, None, [],
                 {n: float(w) for n, w in tensor_weight.items()})
    for p in measured:
        p.predicted = result.predict(p.rel_damage)
    held = [p for p in measured if p.held_out and p.kld is not None]
    result.spearman_held_out = spearman([p.predicted for p in held], [p.kld for p in held])
    result.held_out_ratio = [p.predicted / p.kld if p.kld and p.kld > 0 else float("nan") for p in held]
    return result
