"""Throughput and latency, baseline vs NKAT, measured in one process with alternating runs.

Prompt processing: one batch of seq_len tokens. Generation: one token per decode for
`iterations` tokens after the prompt (greedy), each decode timed. With a theta, the baseline and
the NKAT runtimes run A B A B ... so both see the same machine load, and the overhead is a
ratio measured within each pair.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from ..runtime.engine import Runtime
from ..runtime.settings import RuntimeSettings

_FILLER = (
    "The history of the region is long and varied. Early settlers farmed the river valleys, "
    "traded along the coast and built small towns that later grew into cities. "
)


@dataclass
class BenchOptions:
    seq_len: int = 512
    iterations: int = 100
    repeats: int = 3
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)  # its ctx is set from the two above
    quiet: bool = False


def gpu_offload_available() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def prompt_tokens(runtime: Runtime, seq_len: int, text: bytes | None) -> np.ndarray:
    source = text if text else (_FILLER * (seq_len // 8 + 8)).encode()
    # ~4 bytes per token: tokenize only the start of a long text, repeat a short one.
    tokens = runtime.tokenize(source[: 16 * seq_len])
    while len(tokens) < seq_len:
        tokens = np.concatenate([tokens, tokens])
    return tokens[:seq_len]


def run_once(runtime: Runtime, tokens: np.ndarray, iterations: int) -> dict:
    """Prompt once, then generate `iterations` tokens greedily; times in seconds."""
    runtime.clear()
    t0 = time.perf_counter()
    logits = runtime.decode(tokens, 0, logits_from=len(tokens) - 1)
    prompt_s = time.perf_counter() - t0
    next_token = int(np.argmax(logits[-1]))
    latencies = []
    for i in range(iterations):
        t0 = time.perf_counter()
        logits = runtime.decode([next_token], len(tokens) + i, logits_from=0)
        latencies.append(time.perf_counter() - t0)
        next_token = int(np.argmax(logits[-1]))
    return {"prompt_s": prompt_s, "latencies": latencies}


def summarize(runs: list[dict], seq_len: int) -> dict:
    latencies = np.concatenate([r["latencies"] for r in runs]) * 1000
    gen_tps = [len(r["latencies"]) / sum(r["latencies"]) for r in runs]
    pp_tps = [seq_len / r["prompt_s"] for r in runs]
    return {
        "prompt_tokens_per_second": statistics.median(pp_tps),
        "generation_tokens_per_second": statistics.median(gen_tps),
        "avg_latency_ms": float(latencies.mean()),
        "p50_latency_ms": float(np.percentile(latencies, 50)),
        "p95_latency_ms": float(np.percentile(latencies, 95)),
    }


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _runtime(model, theta, gamma, opts: BenchOptions) -> Runtime:
    return Runtime.from_settings(model, theta, opts.runtime, gamma=gamma, n_ctx=opts.seq_len + opts.iterations + 8,
                                 n_batch=opts.seq_len)


def benchmark(model: str, theta: str | None, gamma: float | None, opts: BenchOptions,
              compare: bool, text: bytes | None = None) -> dict:
    from ..util.report import progress

    base = nkat = None
    try:
        if theta is None or compare:
            base = _runtime(model, None, None, opts)
        if theta is not None:
            nkat = _runtime(model, theta, gamma, opts)
        any_rt = base or nkat
        tokens = prompt_tokens(any_rt, opts.seq_len, text)
        plan = [("baseline", base), ("nkat", nkat)] if (base and nkat) else [("baseline" if base else "nkat", any_rt)]
        runs = {label: [] for label, _ in plan}
        run_once(any_rt, tokens[: min(32, len(tokens))], 4)  # warm-up: page in weights, build graphs
        if base and nkat:
            run_once(nkat, tokens[: min(32, len(tokens))], 4)
        for _ in progress(range(opts.repeats), desc="bench", quiet=opts.quiet, unit="rep"):
            for label, rt in plan:
                runs[label].append(run_once(rt, tokens, opts.iterations))
        settings = (nkat or base).settings()  # the NKAT side's, where there is one: theta, gamma, backend
    finally:
        for rt in (base, nkat):
            if rt is not None:
                rt.close()

    result = {
        "device": "gpu" if opts.runtime.gpu_layers > 0 and gpu_offload_available() else "cpu",
        "theta_enabled": theta is not None,
        "backend": opts.runtime.backend if theta else None,
        "seq_len": opts.seq_len,
        "iterations": opts.iterations,
        "repeats": opts.repeats,
        "settings": settings,
    }
    main_label = "nkat" if theta else "baseline"
    main = summarize(runs[main_label], opts.seq_len)
    result |= {
        "tokens_per_second": main["generation_tokens_per_second"],
        "avg_latency_ms": main["avg_latency_ms"],
        main_label: main,
    }
    if "baseline" in runs and "nkat" in runs:
        result["baseline"] = summarize(runs["baseline"], opts.seq_len)
        gen = [100 * (sum(n["latencies"]) / sum(b["latencies"]) - 1) for b, n in zip(runs["baseline"], runs["nkat"])]
        pp = [100 * (n["prompt_s"] / b["prompt_s"] - 1) for b, n in zip(runs["baseline"], runs["nkat"])]
        result |= {
            "nkat_tokens_per_second": result["nkat"]["generation_tokens_per_second"],
            "baseline_tokens_per_second": result["baseline"]["generation_tokens_per_second"],
            "overhead_percentage": spread(gen)["median"],
            "overhead": {"generation_percent": spread(gen), "prompt_percent": spread(pp)},
        }
    else:
        result["overhead_percentage"] = None
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def measure_overhead(model: str, theta: str, backend: str = "lora", gamma: float | None = None,
                     seq_len: int = 128, iterations: int = 32, repeats: int = 3, threads: int | None = None) -> dict:
    """Generation and prompt overhead of theta, for callers such as the optimizer."""
    opts = BenchOptions(seq_len=seq_len, iterations=iterations, repeats=repeats,
                        runtime=RuntimeSettings(threads=threads, backend=backend), quiet=True)
    return benchmark(model, theta, gamma, opts, compare=True)
