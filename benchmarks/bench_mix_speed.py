"""Generation and prompt speed of two plain GGUF files (an `nkat mix` file against the stock type
nearest in size), run alternately in one process so both see the same machine load.

    python benchmarks/bench_mix_speed.py --a STOCK.gguf --b MIX.gguf [--b-theta MIX.nkat] [--repeats 5]
        [--iterations 64] [--seq-len 512] [--threads 2] [--reference REF.gguf --work-dir DIR] [--json]

With --b-theta, B runs with `nkat mix --theta`'s adapter applied by llama.cpp's LoRA path.

Each repeat runs A then B: a prompt of --seq-len tokens in one batch, then --iterations greedy
tokens one decode at a time (nkat bench's measurement, measure/bench.py). Reported: each side's
median tokens/s, and B/A as the median over the repeats of the per-pair ratio (min..max). The
issue's goal for a mix: generation within 5 % of the stock type nearest in size (B/A >= 0.95).

With --reference (the model both were quantized from) the generation ratio is also predicted from
each type's speed measured in llama.cpp (measure/type_speed.py, as `nkat mix --match-speed` does;
cached in --work-dir, default a temporary directory), so prediction and measurement sit side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugin"))

from nkat_gguf.measure.bench import prompt_tokens, run_once, summarize  # noqa: E402
from nkat_gguf.runtime.engine import Runtime  # noqa: E402
from nkat_gguf.runtime.settings import RuntimeSettings  # noqa: E402
from nkat_gguf.util.report import cpu_name  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="the stock file (the ratio's denominator)")
    ap.add_argument("--b", required=True, help="the mix")
    ap.add_argument("--b-theta", help="the mix's .nkat (nkat mix --theta), applied to B")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", help="the model A and B were quantized from: also predict B/A from type speeds")
    ap.add_argument("--work-dir", help="with --reference: where the type speeds are cached")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    settings = RuntimeSettings(threads=args.threads)
    n_ctx = args.seq_len + args.iterations + 8
    sides = {name: Runtime.from_settings(path, theta, settings, n_ctx=n_ctx, n_batch=args.seq_len)
             for name, path, theta in (("a", args.a, None), ("b", args.b, args.b_theta))}
    try:
        tokens = prompt_tokens(sides["a"], args.seq_len, None)
        for rt in sides.values():
            run_once(rt, tokens[:32], 4)  # warm-up: page the weights in, build the graphs
        runs = {"a": [], "b": []}
        for _ in range(args.repeats):
            for name, rt in sides.items():
                runs[name].append(run_once(rt, tokens, args.iterations))
    finally:
        for rt in sides.values():
            rt.close()

    def ratios(key):
        values = [sum(a[key]) / sum(b[key]) if key == "latencies" else a[key] / b[key]
                  for a, b in zip(runs["a"], runs["b"])]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    result = {
        "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
        "seq_len": args.seq_len, "iterations": args.iterations, "repeats": args.repeats,
        "a": {"file": args.a, "bytes": Path(args.a).stat().st_size, **summarize(runs["a"], args.seq_len)},
        "b": {"file": args.b, "theta": args.b_theta,
              "bytes": Path(args.b).stat().st_size + (Path(args.b_theta).stat().st_size if args.b_theta else 0),
              **summarize(runs["b"], args.seq_len)},
        # B/A of tokens/s = A's time / B's time, per pair
        "generation_ratio_b_over_a": ratios("latencies"),
        "prompt_ratio_b_over_a": ratios("prompt_s"),
    }
    if args.reference:
        result["predicted_generation_ratio_b_over_a"] = predicted_ratio(args, settings)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        g, p = result["generation_ratio_b_over_a"], result["prompt_ratio_b_over_a"]
        print(f"{result['cpu']}, {args.threads} threads: generation {result['b']['generation_tokens_per_second']:.1f} "
              f"vs {result['a']['generation_tokens_per_second']:.1f} tok/s, B/A {g['median']:.3f} "
              f"({g['min']:.3f}..{g['max']:.3f}); prompt B/A {p['median']:.3f} ({p['min']:.3f}..{p['max']:.3f})"
              + (f"; predicted generation B/A {result['predicted_generation_ratio_b_over_a']:.3f}"
                 if result.get("predicted_generation_ratio_b_over_a") else ""))
    return 0


def predicted_ratio(args, settings) -> float | None:
    """B/A of generation tokens/s predicted from the types' measured speeds (measure.type_speed)."""
    import tempfile

    from nkat_gguf.measure.type_speed import measure_type_speed
    from nkat_gguf.recipe.candidates import CANDIDATE_TYPES
    from nkat_gguf.recipe.layout import tensor_types

    types = {side: tensor_types(path) for side, path in (("a", args.a), ("b", args.b))}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        speed = measure_type_speed(args.reference, list(CANDIDATE_TYPES), work, settings, quiet=args.json)
    seconds = {side: speed.predicted_seconds(t) for side, t in types.items()}
    return None if None in seconds.values() else seconds["a"] / seconds["b"]


if __name__ == "__main__":
    sys.exit(main())
