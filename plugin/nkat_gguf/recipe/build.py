"""Mixes of one reference with one imatrix: cost curves, allocation at any budget, and the GGUF
written by llama.cpp's quantizer with one exact override per tensor, its types checked. token_embd
is weighted by its first reader's norm (formats.embedding_importance) in its costs and its file.

`nkat mix` and the frontier's mixed-precision controls both build their files here.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from ..errors import UserError
from ..formats.gguf_io import fingerprint_file
from ..util.report import say
from .allocate import Allocation, Curve, floor, smallest_bytes, sweep, sweep_within_time, tie
from .candidates import CANDIDATE_TYPES
from .costs import DEFAULT_ROWS, Statistics, TensorCost, model_costs
from .layout import Layout, read_layout, tensor_types
from .recipe_file import exact_pattern

EMBEDDING_WEIGHTING = "token_embd weighted by blk.0.attn_norm^2"  # in a mix file's content key

# The llama.cpp file type named in a mix's metadata: that of its most common tensor type.
FTYPE_OF = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0", "F16": "f16",
            "Q2_K": "q2_k", "Q3_K": "q3_k_m", "Q4_K": "q4_k_m", "Q5_K": "q5_k_m", "Q6_K": "q6_k",
            "IQ3_S": "iq3_s", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs"}


class RecipeMismatch(UserError):
    """llama.cpp wrote a tensor in another type than the recipe asked for."""


# output.weight never goes below this type (None: no floor). Its sampled-row damage is weighted
# without input statistics (the imatrix has none for it), which undervalues it: on the 1.5B the
# allocator put it at Q2_K and the mixes lost to stock types (docs/RESULTS.md, `nkat mix`).
# Q5_K is the lowest type llama.cpp's own k- and i-quant files give it (its IQ3_XXS).
OUTPUT_FLOOR = "Q5_K"


def curves_from_costs(costs: dict[str, TensorCost], layout: Layout, tie_gate_up: bool,
                      output_floor: str | None = OUTPUT_FLOOR, weight=None, extras=None, speed=None) -> list[Curve]:
    """One unit per tensor (padded bytes, relative damage times weight(name), 1 without weights);
    ffn_gate and ffn_up of a block tied; output.weight kept at output_floor's bytes or more.
    extras: name -> option -> (GGUF bytes, side-file bytes, damage), more options than the types
    (recipe.theta_option, recipe.gptq_option). speed (measure.type_speed.TypeSpeed): each option's
    time per generated token is its type's (a theta's own matmuls are not counted)."""
    w = weight or (lambda name: 1.0)
    extras = extras or {}
    curves = []
    for n, c in costs.items():
        extra = extras.get(n, {})
        options = list(c.options) + list(extra)
        curves.append(Curve(n, options,
                            [layout.padded(b) for b, _ in c.options.values()]
                            + [layout.padded(g) + t for g, t, _ in extra.values()],
                            [w(n) * option_damage(c, extra, o) for o in options],
                            time=[speed.tensor_seconds(n, option_type(o)) for o in options] if speed else None))
    if output_floor:
        curves = [floor(c, c.bytes[c.options.index(output_floor)])
                  if c.name == "output.weight" and output_floor in c.options else c for c in curves]
    if not tie_gate_up:
        return curves
    groups = [[n, n.replace("ffn_gate", "ffn_up")] for n in costs
              if ".ffn_gate.weight" in n and n.replace("ffn_gate", "ffn_up") in costs]
    return tie(curves, groups)


def option_damage(cost: TensorCost, extra: dict[str, tuple[int, int, float]], option: str) -> float:
    """A tensor's relative damage at one option: a type of its curve, or an extra option (a type +
    theta rank, a type rounded by GPTQ: option -> (GGUF bytes, side-file bytes, damage))."""
    if option in cost.options:
        return cost.relative(option)
    return extra[option][2] / cost.energy if cost.energy > 0 else 0.0


def option_type(option: str) -> str:
    """The GGML type of an option: extra options are 'TYPE+TAG' ('Q3_K+r16', 'Q3_K+gptq')."""
    return option.partition("+")[0]


def check_types(path, recipe: dict[str, str]) -> None:
    """The written file's tensor types equal the recipe; else an error naming the first tensor."""
    written = tensor_types(path)
    for name, want in recipe.items():
        got = written.get(name)
        if got != want:
            raise RecipeMismatch(f"{path}: llama.cpp wrote {name} as {got}, the recipe says {want}")


class MixBuilder:
    def __init__(self, reference: str, imatrix: str, work_dir, *, covariance: str | None = None,
                 rows: int | None = DEFAULT_ROWS, types=CANDIDATE_TYPES, tie_gate_up: bool = True,
                 output_floor: str | None = OUTPUT_FLOOR, threads: int | None = None, quiet: bool = False):
        self.reference, self.imatrix, self.threads, self.quiet = reference, imatrix, threads, quiet
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.ref_key = fingerprint_file(reference)[:12]
        self.imatrix_key = fingerprint_file(imatrix) if imatrix else None  # hashed once, not per recipe
        self.layout = read_layout(reference)
        say(f"[mix] cost curves of {len(self.layout.allocated)} tensors ({rows} sampled rows each)", quiet)
        self.stats = Statistics(imatrix, covariance, reference)
        self.costs = model_costs(reference, self.stats, self.work, rows, types, threads, quiet)
        self.tie_gate_up, self.output_floor = tie_gate_up, output_floor
        self.weight = None
        self.extras: dict[str, dict[str, tuple[int, int, float]]] = {}  # name -> option -> (bytes, side, damage)
        self.extras_fixed = 0  # bytes charged once when the extras are offered (the .nkat's header)
        self.speed = None  # measure.type_speed.TypeSpeed, with set_speed
        self.time_limits: dict[int, float] = {}  # budget bytes -> the most summed tensor time it may take
        self.speed_met: dict[int, bool] = {}  # budget bytes -> whether its last allocation met its limit
        self.curves = curves_from_costs(self.costs, self.layout, tie_gate_up, output_floor)

    def _rebuild(self) -> None:
        self.curves = curves_from_costs(self.costs, self.layout, self.tie_gate_up, self.output_floor, self.weight,
                                        self.extras, self.speed)

    def set_weights(self, weight) -> None:
        """Weigh each tensor's relative damage by weight(name) (a fitted KLD per unit of damage)."""
        self.weight = weight
        self._rebuild()

    def set_extras(self, options: dict[str, dict[str, tuple[int, int, float]]], fixed_bytes: int = 0) -> None:
        """Offer more options than the types: theta (recipe.theta_option.theta_options, the .nkat's
        header charged once as fixed_bytes) or GPTQ rounding (recipe.gptq_option.gptq_options)."""
        self.extras, self.extras_fixed = options, fixed_bytes
        self._rebuild()

    def set_speed(self, speed, limits: dict[int, float]) -> None:
        """Give every option its type's time per generated token (measure.type_speed.TypeSpeed) and
        limit, per budget in bytes, the summed time of the tensors (TypeSpeed.relative_seconds)."""
        self.speed, self.time_limits = speed, limits
        self._rebuild()

    def relative(self, name: str, option: str) -> float:
        """The relative damage of one tensor at one option of its curve (a type, or an extra option)."""
        return option_damage(self.costs[name], self.extras.get(name, {}), option)

    def damage(self, options: dict[str, str]) -> float | None:
        """The predicted damage of a file's options (types or extra options) for every allocated tensor:
        weighted relative damages summed; None if one has no point on its curve (a stock file's type
        outside the candidates)."""
        w = self.weight or (lambda name: 1.0)
        total = 0.0
        for name, cost in self.costs.items():
            option = options.get(name)
            if option not in cost.options and option not in self.extras.get(name, {}):
                return None
            total += w(name) * self.relative(name, option)
        return total

    @property
    def ref_types(self) -> dict[str, str]:
        """Each allocated tensor's type in the reference (its curve knows it: no second read)."""
        return {n: c.ref_type for n, c in self.costs.items()}

    @property
    def fixed(self) -> int:
        return self.layout.fixed + self.extras_fixed

    @property
    def smallest(self) -> int:
        return smallest_bytes(self.curves, self.fixed)

    def allocate(self, targets: list[int]) -> list[Allocation | None]:
        """One sweep for every target (GGUF + .nkat bytes); None where even the cheapest file is larger.
        A target with a time limit (set_speed) is solved again within it (allocate.sweep_within_time)."""
        out = sweep(self.curves, self.fixed, targets)
        for i, target in enumerate(targets):
            limit = self.time_limits.get(target)
            if limit is not None and out[i] is not None:
                out[i], self.speed_met[target] = sweep_within_time(self.curves, self.fixed, target, limit)
        return out

    def recipe(self, alloc: Allocation) -> dict[str, str]:
        """Tensor name -> option (a type, or an extra option), in the file's tensor order."""
        by_member = {m: alloc.choice[c.name] for c in self.curves for m in c.members}
        return {n: by_member[n] for n in self.layout.allocated}

    def types(self, alloc: Allocation) -> dict[str, str]:
        """Tensor name -> the GGML type of its option: the file llama.cpp writes for the allocation."""
        return {n: option_type(o) for n, o in self.recipe(alloc).items()}

    def key(self, recipe: dict[str, str]) -> str:
        """The content key of a recipe's file: reference, imatrix, every tensor's type, and whether
        token_embd is weighted (only where it is quantized again: kept, it is copied as stored)."""
        parts = [self.ref_key, self.imatrix_key, sorted(recipe.items())]
        if any(recipe.get(n, self.costs[n].ref_type) != self.costs[n].ref_type for n in self.stats.extra):
            parts.append(EMBEDDING_WEIGHTING)  # token_embd quantized again, weighted: other bytes
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def path(self, key: str) -> Path:
        """Where the mix of the recipe with this content key is (or would be) cached."""
        return self.work / f"mix-{self.ref_key}-{key}.gguf"

    def write(self, recipe: dict[str, str]) -> Path:
        """The mix for a recipe in the work dir (cached by content), its tensor types checked."""
        from ..runtime.quantize import quantize_model

        path = self.path(self.key(recipe))
        if not path.is_file():
            counts = Counter(recipe.values())
            ftype = next((FTYPE_OF[t] for t, _ in counts.most_common() if t in FTYPE_OF), "q8_0")
            quantize_model(self.reference, str(path), ftype, self.threads, imatrix=self.imatrix,
                           overrides={exact_pattern(n): t for n, t in recipe.items()},
                           weigh_embedding=bool(self.stats.extra))
        check_types(path, recipe)
        return path
