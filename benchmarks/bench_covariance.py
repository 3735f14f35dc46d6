"""Exact (covariance) theta against the diagonal one, and budgeted ranks against uniform ones.

    python benchmarks/bench_covariance.py [--work DIR] [--chunks 8] [--calib-chunks 16] [--json]

On the demo pair (reference: the embedded SmolLM2-135M-Instruct Q4_1; base: its Q4_0 from
`nkat quantize`), all through the `nkat` commands in child processes:
  1. calibrate on WikiText-2 *valid* (never the test text): an imatrix and a covariance file;
  2. convert: residual-act (diagonal) and residual-cov (exact) at rank 8 and 32, and residual-cov
     with --budget-mb set to the file size of uniform rank 8 (the same bytes, spent by the greedy cut);
  3. one `nkat ppl` run over WikiText-2 test (ctx 512, --chunks chunks) scoring every theta on the
     same chunks against the reference; gap recovered = (PPL_base - PPL) / (PPL_base - PPL_ref).
Prints each theta's gap recovered and the issue's goals (rank 32 >= 80 %, rank 8 >= 60 %, budget
at rank-8 bytes >= uniform rank 8 + 5 points) as met / not met.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
sys.path.insert(0, str(REPO / "plugin"))

from nkat_gguf.formats.defaults import default_model_path  # noqa: E402
from nkat_gguf.util.report import cpu_name  # noqa: E402


def nkat(*args: str) -> dict:
    cmd = [sys.executable, "-m", "nkat_gguf.cli", *args, "--json"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr}")
    out = json.loads(done.stdout)
    out["_wall_seconds"] = time.perf_counter() - started
    out["_command"] = "nkat " + " ".join(args)
    return out



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/nkat-bench-cov", help="where the generated files go")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of WikiText-2 test (default 8)")
    ap.add_argument("--calib-chunks", type=int, default=16, help="calibration chunks of WikiText-2 valid (default 16)")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = ["--threads", args.threads]
    steps = {}

    base = work / "q4_0.gguf"
    if not base.exists():
        steps["quantize"] = nkat("quantize", "--output", str(base))
    reference = str(default_model_path())
    imatrix, cov = work / "valid.imatrix", work / "valid.cov"
    steps["calibrate_imatrix"] = nkat("calibrate", "--model", reference, "--chunks", str(args.calib_chunks),
                                      "--output", str(imatrix), *t)
    steps["calibrate_covariance"] = nkat("calibrate", "--covariance", "--model", reference, "--chunks",
                                         str(args.calib_chunks), "--output", str(cov), *t)

    common = ["--model", str(base), "--reference", reference]
    thetas = {}

    def convert(label: str, *extra: str) -> None:
        out = work / f"{label}.nkat"
        steps[f"convert {label}"] = nkat("convert", *common, "--output", str(out), *extra)
        thetas[label] = out

    for rank in ("8", "32"):
        convert(f"act-r{rank}", "--source", "residual-act", "--imatrix", str(imatrix), "--theta-rank", rank)
        convert(f"cov-r{rank}", "--source", "residual-cov", "--covariance", str(cov), "--theta-rank", rank)
    r8_mb = thetas["cov-r8"].stat().st_size / 2**20
    convert("cov-budget-r8bytes", "--source", "residual-cov", "--covariance", str(cov), "--theta-rank", "8",
            "--budget-mb", f"{r8_mb:.6f}")

    ppl_args = ["ppl", "--model", str(base), "--reference", reference, "--chunks", str(args.chunks), "--ctx", "512", *t]
    for path in thetas.values():
        ppl_args += ["--theta", str(path)]
    ppl = nkat(*ppl_args)
    rows = {r["label"]: r for r in ppl["rows"]}
    gaps = {label: 100 * rows[f"+ {path.name}"]["gap_recovered"] for label, path in thetas.items()}
    sizes = {label: path.stat().st_size for label, path in thetas.items()}

    goals = {
        "residual-cov rank 32 >= 80 %": gaps["cov-r32"] >= 80,
        "residual-cov rank 8 >= 60 %": gaps["cov-r8"] >= 60,
        "budget at rank-8 bytes >= uniform rank 8 + 5 points": gaps["cov-budget-r8bytes"] >= gaps["cov-r8"] + 5,
    }
    result = {
        "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "ppl_base": ppl["ppl_base"], "ppl_reference": ppl.get("ppl_reference"), "chunks": args.chunks,
        "gap_recovered_pct": gaps, "file_bytes": sizes,
        "ppl": {label: rows[f"+ {path.name}"]["ppl"] for label, path in thetas.items()},
        "goals": goals,
        "calibration": {k: {x: steps[k].get(x) for x in ("seconds", "peak_rss_mb", "passes", "chunks")}
                        for k in ("calibrate_imatrix", "calibrate_covariance")},
        "convert_seconds": {k[len("convert "):]: v["seconds"] for k, v in steps.items() if k.startswith("convert ")},
        "commands": [s["_command"] for s in steps.values()] + ["nkat " + " ".join(ppl_args)],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['cpu']}, {result['date']}: demo pair, WikiText-2 test, ctx 512, {args.chunks} chunks; "
          f"PPL base {ppl['ppl_base']:.3f}, reference {ppl.get('ppl_reference'):.3f}")
    for label in thetas:
        print(f"  {label:22s} PPL {result['ppl'][label]:8.3f}  gap recovered {gaps[label]:6.1f} %  "
              f"file {sizes[label] / 2**20:6.3f} MiB")
    for goal, met in goals.items():
        print(f"  goal {goal}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
