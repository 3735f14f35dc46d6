"""INT8 star-product kernel throughput at generation batch size 1, against this machine's memory
bandwidth measured in the same run. Prints JSON.

    python benchmarks/bench_kernel.py [--total-mb 256] [--dim 4096] [--rank 64] [--repeats 5]

theta GB/s = bytes of INT8 factors + scales streamed per input column / time, over a set of
matrices larger than the caches (so the factors come from DRAM, as for a large model).
Memory bandwidth = numpy reading a buffer of the same size (sum), with 1 and with all threads;
the kernel runs one column on one thread, so `ratio` compares it with the 1-thread figure.
Also reported: the default model's shapes at rank 8, per generated token and per 512-token prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nkat_gguf.runtime import native
from nkat_gguf.runtime.native import ffi, lib

SMOLLM2_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(nbytes: int, threads: int, repeats: int) -> float:
    """GB/s of numpy summing a float32 buffer of nbytes, split over `threads` threads."""
    data = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    if threads == 1:
        seconds = best_of(lambda: data.sum(), repeats)
    else:
        with ThreadPoolExecutor(threads) as pool:
            seconds = best_of(lambda: list(pool.map(np.sum, parts)), repeats)
    return data.nbytes / seconds / 1e9


class FactorSet:
    """Random INT8 factors for many matrices, with their cffi structs built once."""

    def __init__(self, shapes: list[tuple[int, int]], rank: int, n_cols: int = 1, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.keep, self.calls, self.n_cols = [], [], n_cols
        self.nbytes = 0
        for n_out, n_in in shapes:
            f = native.Int8Factors("", rng.integers(-127, 128, (rank, n_in), dtype=np.int8),
                                   rng.uniform(0.001, 0.01, rank).astype(np.float32),
                                   rng.integers(-127, 128, (rank, n_out), dtype=np.int8),
                                   rng.uniform(0.001, 0.01, n_out).astype(np.float32))
            x = rng.standard_normal((n_cols, n_in)).astype(np.float32)
            y = np.zeros((n_cols, n_out), np.float32)
            s = native._factor_struct(f, self.keep)
            self.keep += [x, y, s]
            self.calls.append((s, ffi.from_buffer("float[]", x), n_in, ffi.from_buffer("float[]", y), n_out))
            self.nbytes += f.nbytes

    def run(self, threads: int) -> None:
        apply, n_cols = lib.nkat_star_apply, self.n_cols
        for s, x, n_in, y, n_out in self.calls:
            apply(s, x, n_in, y, n_out, n_cols, 1.0, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-mb", type=float, default=256, help="theta bytes streamed per pass (default 256 MB)")
    ap.add_argument("--dim", type=int, default=4096, help="n_out = n_in of each matrix (default 4096, a 7B layer)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    print(json.dumps(measure(args.total_mb, args.dim, args.rank, args.repeats, args.threads), indent=2))


def measure(total_mb: float = 256, dim: int = 4096, rank: int = 64, repeats: int = 5,
            threads: int = os.cpu_count() or 1, model_figures: bool = True) -> dict:
    """The kernel's GB/s per ISA against numpy's read bandwidth, and (model_figures) the default
    model's per-token and per-prompt times."""
    per_matrix = rank * 2 * dim + 4 * (rank + dim)
    count = max(1, int(total_mb * 1e6 // per_matrix))
    big = FactorSet([(dim, dim)] * count, rank)
    big.run(1)  # warm up (page faults)

    result = {"isa_best": native.best_isa(), "threads": threads, "matrices": count, "dim": dim,
              "rank": rank, "theta_bytes": big.nbytes, "batch": 1}
    result["memory_read_GBps_1_thread"] = read_bandwidth(big.nbytes, 1, repeats)
    result["memory_read_GBps_all_threads"] = read_bandwidth(big.nbytes, threads, repeats)
    for isa in native.supported_isas():
        with native.use_isa(isa):
            result[f"theta_GBps_{isa}_1_thread"] = big.nbytes / best_of(lambda: big.run(1), repeats) / 1e9
    result["theta_GBps"] = result[f"theta_GBps_{native.best_isa()}_1_thread"]
    result["ratio"] = result["theta_GBps"] / result["memory_read_GBps_1_thread"]
    if not model_figures:
        return result

    # The default model's 210 matrices at rank 8: per generated token (in cache), and a
    # 512-token prompt batch on 1 thread and on all threads (columns split across threads).
    small = FactorSet(SMOLLM2_SHAPES * 30, 8)
    result["smollm2_r8_theta_bytes"] = small.nbytes
    result["smollm2_r8_kernel_us_per_token"] = best_of(lambda: small.run(1), max(repeats, 20)) * 1e6
    batch = FactorSet(SMOLLM2_SHAPES * 30, 8, n_cols=512)
    for n in sorted({1, threads}):
        seconds = best_of(lambda: batch.run(n), repeats)
        result[f"smollm2_r8_prompt512_ms_{n}_threads"] = seconds * 1e3
    return result


if __name__ == "__main__":
    main()
