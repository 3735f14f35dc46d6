"""Conversion speed and memory: the default model at r=8/32, and 7B-shaped matrices extrapolated.

    python benchmarks/bench_convert.py [--json]

Part 1 runs `nkat convert` on the demo pair (SmolLM2 Q4_0 base, Q4_1 reference) in a child
process and reports wall time and peak RSS. Part 2 times the per-matrix work of a 7B conversion
(dequantize two Q4_0 matrices of LLaMA-7B shapes, subtract, rank-32 truncated SVD, Q8_0) and
extrapolates to 32 layers x (4 attention 4096x4096 + 3 FFN 4096x11008 / 11008x4096), reporting
the peak RSS above the start as the memory a 7B conversion needs beside its memory map.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugin"))

from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from nkat_gguf.theta import lowrank as theta  # noqa: E402
from nkat_gguf.formats.defaults import default_model_path  # noqa: E402
from nkat_gguf.formats.nkat_format import encode  # noqa: E402

SEVEN_B_LAYERS = 32
SEVEN_B_SHAPES = {"attn 4096x4096": ((4096, 4096), 4), "ffn gate/up 11008x4096": ((11008, 4096), 2),
                  "ffn down 4096x11008": ((4096, 11008), 1)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_model_runs(work: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
    base = work / "q4_0.gguf"
    subprocess.run([sys.executable, "-m", "nkat_gguf.cli", "quantize", "--output", str(base), "--json"],
                   check=True, capture_output=True, env=env)
    rows = []
    for rank in (8, 32):
        cmd = [sys.executable, "-m", "nkat_gguf.cli", "convert", "--input", str(base), "--reference",
               str(default_model_path()), "--theta-rank", str(rank), "--output", str(work / f"r{rank}.nkat"), "--json"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        summary = json.loads(done.stdout)
        rows.append({"rank": rank, "wall_seconds": wall, "convert_seconds": summary["seconds"],
                     "peak_rss_mb": summary["peak_rss_mb"], "theta_bytes": summary["theta_bytes"]})
    return rows


def seven_b_matrix(shape, rank, rng) -> dict:
    """Time one 7B-shaped matrix: Q4_0 bytes of W_ref and W_q -> residual -> SVD -> Q8_0."""
    w = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    ref_bytes = quantize(w, GGMLQuantizationType.Q8_0)
    q_bytes = quantize(w, GGMLQuantizationType.Q4_0)
    del w
    t0 = time.perf_counter()
    E = dequantize(ref_bytes, GGMLQuantizationType.Q8_0) - dequantize(q_bytes, GGMLQuantizationType.Q4_0)
    t1 = time.perf_counter()
    B, A = theta.factors(E, rank, "general")
    t2 = time.perf_counter()
    encode(A, GGMLQuantizationType.Q8_0), encode(B * rank, GGMLQuantizationType.Q8_0)
    t3 = time.perf_counter()
    return {"dequantize_s": t1 - t0, "svd_s": t2 - t1, "encode_s": t3 - t2, "total_s": t3 - t0}


def seven_b(rank: int = 32) -> dict:
    rng = np.random.default_rng(0)
    start_rss = rss_mb()
    per_shape, total = {}, 0.0
    for label, (shape, per_layer) in SEVEN_B_SHAPES.items():
        timing = seven_b_matrix(shape, rank, rng)
        per_shape[label] = timing
        total += timing["total_s"] * per_layer * SEVEN_B_LAYERS
    return {"rank": rank, "per_matrix": per_shape, "extrapolated_minutes": total / 60,
            "peak_rss_above_start_mb": rss_mb() - start_rss, "matrices": 7 * SEVEN_B_LAYERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-default", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"default_model": [] if args.skip_default else default_model_runs(Path(tmp)),
                  "seven_b": seven_b(32), "cpu_count": os.cpu_count()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for row in result["default_model"]:
        print(f"default model r={row['rank']}: {row['convert_seconds']:.1f} s convert "
              f"({row['wall_seconds']:.1f} s wall), peak RSS {row['peak_rss_mb']:.0f} MB")
    s = result["seven_b"]
    for label, t in s["per_matrix"].items():
        print(f"7B {label}: dequantize {t['dequantize_s']:.2f} s, SVD {t['svd_s']:.2f} s, Q8_0 {t['encode_s']:.2f} s")
    print(f"7B extrapolated ({s['matrices']} matrices, r=32): {s['extrapolated_minutes']:.1f} min, "
          f"peak RSS above start {s['peak_rss_above_start_mb']:.0f} MB")


if __name__ == "__main__":
    main()
