"""What refitting lora_b after lora_a's Q8_0 rounding buys, in expected output error.

    python benchmarks/bench_refit.py --model BASE.gguf --reference REF.gguf --covariance C.cov [--rank 8]

For every block matrix: E = W_ref - W_base, L from the calibration covariance, the exact rank-r
factors (P, Q); then the expected output error E||(E - B A) x||^2 = ||(E - B A) L||_F^2 for
  exact:   B = P, A = Q^T                   (no storage rounding)
  rounded: B = P, A = Q8_0(Q^T)             (what convert stores without --refit-b)
  refit:   B = refit_b(E, L, Q8_0(Q^T))      (--refit-b)
summed over matrices, relative to the error with no theta (||E L||_F^2). No decoding: the
statistics are the calibration text's, so this measures the method, not held-out perplexity.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))

from nkat_gguf.theta import lowrank as theta  # noqa: E402
from nkat_gguf.formats.covariance import CovarianceFile  # noqa: E402
from nkat_gguf.formats.gguf_io import ModelFile  # noqa: E402
from nkat_gguf.formats.nkat_format import stored_roundtrip  # noqa: E402


def whitened_error(E, L, B, A) -> float:
    return float(np.linalg.norm((E - B.astype(np.float64) @ A.astype(np.float64)) @ L) ** 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--covariance", required=True)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    model, ref, cov = ModelFile(args.model), ModelFile(args.reference), CovarianceFile(args.covariance)
    totals = dict.fromkeys(("none", "exact", "rounded", "refit"), 0.0)
    for name in model.target_names():
        E = (ref.dequantize(name) - model.dequantize(name)).astype(np.float64)
        L = theta.covariance_root(cov.autocorrelation(name))
        P, Q, _ = theta.whitened_low_rank(E, L, args.rank)
        A = stored_roundtrip(np.ascontiguousarray(Q.T), "q8_0")
        totals["none"] += float(np.linalg.norm(E @ L) ** 2)
        totals["exact"] += whitened_error(E, L, P, Q.T)
        totals["rounded"] += whitened_error(E, L, P, A)
        totals["refit"] += whitened_error(E, L, theta.refit_b(E, L, A), A)
    relative = {k: v / totals["none"] for k, v in totals.items()}
    print(json.dumps({"rank": args.rank, "relative_output_error": relative,
                      "refit_recovers_pct_of_rounding_loss": 100 * (relative["rounded"] - relative["refit"])
                      / max(relative["rounded"] - relative["exact"], 1e-300)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
