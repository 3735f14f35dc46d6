"""The allocator against brute force on small synthetic problems, budgets never exceeded, damage
never rising with the budget; a time limit met wherever brute force meets it; guardrails; recipe
files round-trip in llama-quantize's syntax."""

import itertools

import numpy as np
import pytest

from nkat_gguf.recipe.allocate import Curve, floor, lower_hull, smallest_bytes, sweep, sweep_within_time, tie
from nkat_gguf.recipe.recipe_file import exact_pattern, read_recipe, write_recipe


def random_curves(rng, n_units, n_options):
    curves = []
    for u in range(n_units):
        b = np.sort(rng.choice(np.arange(10, 200), size=n_options, replace=False))
        d = np.sort(rng.uniform(0, 10, size=n_options))[::-1] + rng.uniform(-1.5, 1.5, size=n_options)
        curves.append(Curve(f"t{u}", [f"T{i}" for i in range(n_options)], b, d))
    return curves


def brute_force(curves, fixed, budget):
    best = None
    for combo in itertools.product(*[range(len(c.options)) for c in curves]):
        b = fixed + sum(int(c.bytes[i]) for c, i in zip(curves, combo))
        d = sum(float(c.damage[i]) for c, i in zip(curves, combo))
        if b <= budget and (best is None or d < best):
            best = d
    return best


@pytest.mark.parametrize("seed", range(12))
def test_sweep_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    curves = random_curves(rng, n_units=4, n_options=4)
    fixed = 100
    lo = smallest_bytes(curves, fixed)
    hi = fixed + sum(int(c.bytes.max()) for c in curves)
    budgets = list(range(lo - 5, hi + 10, 3))
    allocs = sweep(curves, fixed, budgets)
    breakpoints = hull_breakpoints(curves, fixed)
    for budget, a in zip(budgets, allocs):
        exact = brute_force(curves, fixed, budget)
        if exact is None:
            assert a is None and budget < lo
            continue
        assert a.bytes <= budget  # never exceeded
        by_choice = fixed + sum(int(c.bytes[c.options.index(a.choice[c.name])]) for c in curves)
        assert by_choice == a.bytes
        assert a.damage == pytest.approx(sum(float(c.damage[c.options.index(a.choice[c.name])]) for c in curves))
        assert a.damage >= exact - 1e-9  # nothing beats the exhaustive optimum
    for budget in breakpoints:  # at the Lagrangian points the sweep is the exact optimum
        (a,) = sweep(curves, fixed, [budget])
        assert a.damage == pytest.approx(brute_force(curves, fixed, budget), abs=1e-9)
    damages = [a.damage for a in allocs if a is not None]
    assert all(x >= y - 1e-12 for x, y in zip(damages, damages[1:]))  # never rises with the budget


def hull_breakpoints(curves, fixed):
    """Total bytes after each prefix of the upgrade steps sorted by damage removed per byte."""
    hulls = [lower_hull(c.bytes, c.damage) for c in curves]
    steps = sorted(((c.damage[h[k]] - c.damage[h[k - 1]]) / (c.bytes[h[k]] - c.bytes[h[k - 1]]),
                    int(c.bytes[h[k]] - c.bytes[h[k - 1]])) for c, h in zip(curves, hulls) for k in range(1, len(h)))
    total = fixed + sum(int(c.bytes[h[0]]) for c, h in zip(curves, hulls))
    points = [total]
    for _, db in steps:
        total += db
        points.append(total)
    return points


def test_what_the_hull_steps_leave_is_spent_under_a_step():
    """A budget between two hull points of a unit takes the option under the hull that fits (the
    hull step 10 -> 30 bytes is too large; the 15-byte option is not on the hull but fits)."""
    big = Curve("embd", ["Q2", "Q3", "Q8"], [10, 15, 30], [10.0, 9.9, 0.0])
    small = Curve("v", ["Q4", "Q8"], [5, 6], [1.0, 0.0])
    assert lower_hull(big.bytes, big.damage) == [0, 2]
    (a,) = sweep([big, small], 100, [100 + 15 + 6])
    assert a.choice == {"embd": "Q3", "v": "Q8"} and a.bytes == 121
    assert a.damage == pytest.approx(9.9) == brute_force([big, small], 100, 121)


def timed_curves(rng, n_units, n_options):
    """Random curves whose options also take time; cheaper options are often slower (i-quants)."""
    curves = random_curves(rng, n_units, n_options)
    for c in curves:
        c.time = rng.uniform(0, 5, size=n_options)
    return curves


def brute_force_times(curves, fixed, budget):
    """(least time of any combination within the budget, least damage of those within a limit)."""
    combos = [combo for combo in itertools.product(*[range(len(c.options)) for c in curves])
              if fixed + sum(int(c.bytes[i]) for c, i in zip(curves, combo)) <= budget]
    return [(sum(float(c.time[i]) for c, i in zip(curves, combo)), sum(float(c.damage[i]) for c, i in zip(curves, combo)))
            for combo in combos]


@pytest.mark.parametrize("seed", range(12))
def test_time_limit_is_met_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    curves = timed_curves(rng, n_units=4, n_options=4)
    budget = smallest_bytes(curves, 0) + 150
    free, _ = sweep_within_time(curves, 0, budget, float("inf"))
    (plain,) = sweep(curves, 0, [budget])
    assert free.choice == plain.choice  # a limit that does not bind changes nothing
    options = brute_force_times(curves, 0, budget)
    fastest = min(t for t, _ in options)
    limit = (fastest + free.time) / 2  # binding, reachable
    alloc, met = sweep_within_time(curves, 0, budget, limit)
    assert met and alloc.time <= limit + 1e-9 and alloc.bytes <= budget
    assert alloc.damage >= min(d for t, d in options if t <= limit) - 1e-9  # brute force's optimum bounds it
    idx = [c.options.index(alloc.choice[c.name]) for c in curves]
    assert alloc.time == pytest.approx(sum(c.time[i] for c, i in zip(curves, idx)))
    assert alloc.damage == pytest.approx(sum(c.damage[i] for c, i in zip(curves, idx)))
    slowest, met = sweep_within_time(curves, 0, budget, fastest - 1.0)  # unreachable: the fastest found
    assert not met and slowest.bytes <= budget


def test_time_limit_upgrades_the_unit_that_saves_most_time_per_damage():
    """Two units, each with a cheap slow option (an i-quant) and a faster one at a little more damage
    per the same bytes; the budget fits both fast options, the limit needs one: the one that costs
    the least damage per second saved is taken."""
    a = Curve("a", ["IQ", "K"], [10, 10], [1.0, 1.3], time=[5.0, 1.0])  # 0.3 damage for 4 s
    b = Curve("b", ["IQ", "K"], [10, 10], [1.0, 1.2], time=[5.0, 3.0])  # 0.2 damage for 2 s
    (free,) = sweep([a, b], 0, [20])
    assert free.choice == {"a": "IQ", "b": "IQ"}
    alloc, met = sweep_within_time([a, b], 0, 20, 7.0)
    assert met and alloc.choice == {"a": "K", "b": "IQ"} and alloc.time == 6.0
    alloc, met = sweep_within_time([a, b], 0, 20, 4.0)
    assert met and alloc.choice == {"a": "K", "b": "K"}


def test_lower_hull_drops_dominated_and_concave_points():
    b = np.array([10, 20, 30, 40, 25])
    d = np.array([10.0, 9.5, 2.0, 1.0, 12.0])  # (20, 9.5) lies above the segment 10 -> 30; (25, 12) dominated
    assert lower_hull(b, d) == [0, 2, 3]


def test_tie_and_floor():
    a = Curve("gate", ["Q4_0", "Q8_0", "F16"], [10, 20, 40], [5.0, 1.0, 0.0])
    u = Curve("up", ["Q4_0", "Q8_0"], [11, 21], [6.0, 2.0])
    (tied,) = tie([a, u], [["gate", "up"]])
    assert tied.options == ["Q4_0", "Q8_0"] and list(tied.bytes) == [21, 41] and list(tied.damage) == [11.0, 3.0]
    assert tied.members == ["gate", "up"]
    (alloc,) = sweep([tied], 0, [30])
    assert alloc.choice == {"gate+up": "Q4_0"}
    assert floor(a, 20).options == ["Q8_0", "F16"]


def test_recipe_file_round_trip(tmp_path):
    recipe = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "IQ4_NL", "blk.10.ffn_down.weight": "Q3_K",
              "output.weight": "Q6_K"}
    path = tmp_path / "mix.recipe.txt"
    write_recipe(path, recipe)
    assert read_recipe(path) == recipe
    lines = path.read_text().split()
    assert lines[1] == r"^blk\.0\.attn_q\.weight$=IQ4_NL"  # llama-quantize: pattern=type tokens, no comments
    import re
    assert re.search(exact_pattern("blk.1.ffn_down.weight"), "blk.10.ffn_down.weight") is None


def test_budgets_parse_to_bytes():
    from nkat_gguf.errors import UserError
    from nkat_gguf.recipe.budgets import budget_bytes, parse_budget

    stock = {"q3_k_s": 11, "q4_0": 2}
    assert budget_bytes(parse_budget("300", stock), 10, None) == 300 << 20
    assert budget_bytes(parse_budget("1.5MiB", stock), 10, None) == int(1.5 * (1 << 20))
    assert budget_bytes(parse_budget("4bpw", stock), 1000, None) == 500
    like = parse_budget("q3_k_s", stock)
    assert like.tag == "like-Q3_K_S" and budget_bytes(like, 10, {"Q3_K_S": 1234}.get) == 1234
    for bad in ("abc", "0", "-3", "Q9_K"):
        with pytest.raises(UserError):
            parse_budget(bad, stock)


def test_output_is_never_allocated_below_its_floor():
    """With the floor, the allocator cannot buy bytes for other tensors by crushing output.weight, even
    where its (undervalued) damage would make that the cheapest choice."""
    from nkat_gguf.recipe.build import curves_from_costs
    from nkat_gguf.recipe.costs import TensorCost
    from nkat_gguf.recipe.layout import Layout

    layout = Layout(alignment=32, header=0, fixed_tensors=0, n_weights=0, allocated=["output.weight", "blk.0.ffn_down.weight"])
    costs = {
        "output.weight": TensorCost("output.weight", 1, 1, "Q6_K", 1.0,
                                    {"Q2_K": (96, 1e-6), "Q5_K": (192, 0.0), "Q6_K": (224, 0.0)}),
        "blk.0.ffn_down.weight": TensorCost("blk.0.ffn_down.weight", 1, 1, "Q4_K", 1.0,
                                            {"Q2_K": (96, 0.5), "Q4_K": (192, 0.0)}),
    }
    budget = 300  # room for Q2_K output + Q4_K ffn_down, or Q5_K output + Q2_K ffn_down
    free = sweep(curves_from_costs(costs, layout, True, None), 0, [budget])[0].choice
    assert free == {"output.weight": "Q2_K", "blk.0.ffn_down.weight": "Q4_K"}
    floored = sweep(curves_from_costs(costs, layout, True, "Q5_K"), 0, [budget])[0].choice
    assert floored == {"output.weight": "Q5_K", "blk.0.ffn_down.weight": "Q2_K"}
