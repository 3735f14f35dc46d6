"""nkat bench: the seed's JSON schema, no overhead when theta is switched off (gamma 0), --benchmark."""

import json
import os
import subprocess
import sys

from conftest import REPO


def run_bench(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", "bench", *map(str, args), "--json"],
                          capture_output=True, text=True, timeout=600, env=env)


def bench(*args):
    done = run_bench(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_compare_schema_at_gamma_zero(base_model, theta_r8):
    r = bench("--model", base_model, "--theta", theta_r8, "--theta-gamma", "0", "--compare",
              "--seq-len", "64", "--iterations", "24", "--repeats", "5", "--no-cuda")
    for key in ("tokens_per_second", "avg_latency_ms", "device", "theta_enabled", "overhead_percentage",
                "nkat_tokens_per_second", "baseline_tokens_per_second", "peak_rss_mb"):
        assert key in r, key
    assert r["device"] == "cpu" and r["theta_enabled"] is True
    for side in ("baseline", "nkat"):
        s = r[side]
        assert s["prompt_tokens_per_second"] > 0 and s["generation_tokens_per_second"] > 0
        assert s["p50_latency_ms"] <= s["p95_latency_ms"]
    spread = r["overhead"]["generation_percent"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert set(r["overhead"]["prompt_percent"]) == {"median", "min", "max"}
    # The NKAT side ran with the theta at the gamma asked for (0 detaches it). How close its speed is
    # to the baseline's is machine noise, measured by `nkat bench --compare`, not asserted here.
    assert r["settings"]["theta"] == str(theta_r8) and r["settings"]["gamma"] == 0


def test_plain_benchmark_without_theta(reference_model):
    r = bench("--model", reference_model, "--seq-len", "32", "--iterations", "8", "--repeats", "1")
    assert r["theta_enabled"] is False and r["overhead_percentage"] is None
    assert r["tokens_per_second"] == r["baseline"]["generation_tokens_per_second"] > 0


def test_benchmark_flag_is_the_standard_run(reference_model):
    r = bench("--model", reference_model, "--benchmark", "--repeats", "1", "--no-cuda")
    assert r["standard"] is True and (r["seq_len"], r["iterations"]) == (512, 100)
    assert r["baseline"]["prompt_tokens_per_second"] > 0


def test_benchmark_flag_refuses_other_sizes(reference_model):
    for extra in (["--seq-len", "64"], ["--iterations", "8"], ["--text", reference_model]):
        done = run_bench("--model", reference_model, "--benchmark", *extra)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.count("\n") == 1 and "--benchmark" in done.stderr, done.stderr
