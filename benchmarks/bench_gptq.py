"""GPTQ block propagation (nkat quantize --method gptq) against llama.cpp's imatrix quantization at
identical types and bytes.

    python benchmarks/bench_gptq.py [--reference REF.gguf] [--types q4_0,q2_k] [--chunks 8]
        [--calib-chunks 32] [--damps 0.001,0.01,0.03,0.1,0.3] [--second-text FILE] [--lock FILE] [--json]

Texts: WikiText-2 *valid* is the calibration text, split at its middle line into halves A and B.
  A: the covariance the files are quantized with, and the imatrix (its diagonal) llama.cpp's are;
  B: held out, only for choosing the damping (never the test text).
Evaluation: WikiText-2 test (first text), and a second text nobody here wrote and never used for
calibration: by default the concatenation, in sorted file-name order, of the .py files directly
under this Python's standard library directory (sysconfig 'stdlib').

1. Damping and order, layer level (no llama.cpp): on every --sweep-every-th block's matrices of the
   reference, for each type and damping, the output error tr((W-Q) R_B (W-Q)^T) under B's
   covariance, GPTQ divided by ggml's imatrix rounding (importance = diagonal of A) at the same
   type. Reported as the ratio of sums over the matrices; the damping with the lowest ratio on the
   first type is the one the files are written with (--damp overrides). Then the same for blocks
   left to right instead of the order of importance, and, in k-quants, for whole blocks (ggml's
   codes kept, no rounding column by column inside a block).
2. Model level, per type: llama.cpp's imatrix quantization (`nkat quantize --imatrix A`) and GPTQ
   (`nkat quantize --method gptq --covariance A --imatrix A`), checked to have identical tensor
   types and bytes, scored by `nkat ppl` against the reference on --chunks chunks of ctx 512 of each
   evaluation text: KLD ratio GPTQ / llama.cpp (goals: Q4_0 on the demo model <= 0.85; Q2_K and
   Q3_K_S on Qwen2.5-Coder-1.5B <= 0.8).
Every step is a child `nkat` process (under `flock --lock` when given, one step at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
sys.path.insert(0, str(REPO / "plugin"))

from nkat_gguf.formats.defaults import default_model_path  # noqa: E402
from nkat_gguf.util.report import cpu_name  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
GOALS = {"q4_0": 0.85, "q2_k": 0.8, "q3_k_s": 0.8}


@contextlib.contextmanager
def locked(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def nkat(lock: str | None, *args: str) -> dict:
    """Run one nkat command; its JSON, with its wall time and its own peak RSS (wait4's rusage)."""
    cmd = [sys.executable, "-m", "nkat_gguf.cli", *args, "--json", "--quiet"]
    started = time.perf_counter()
    with locked(lock), tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        child = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=ENV)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0), err_f.seek(0)
        stdout, stderr = out_f.read().decode(), err_f.read().decode(errors="replace")
    if child.returncode != 0:
        sys.exit(f"failed ({child.returncode}): {' '.join(cmd)}\n{stderr}")
    out = json.loads(stdout)
    out["_seconds"] = time.perf_counter() - started
    out["_peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports kilobytes
    out["_command"] = "nkat " + " ".join(args)
    return out


def split_valid(valid: Path, work: Path) -> tuple[Path, Path]:
    lines = valid.read_text(encoding="utf-8").splitlines(keepends=True)
    a, b = work / "valid_a.txt", work / "valid_b.txt"
    a.write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")
    b.write_text("".join(lines[len(lines) // 2:]), encoding="utf-8")
    return a, b


def code_calibration(halves: tuple[Path, Path]) -> tuple[Path, Path]:
    """Each calibration half interleaved, piece by piece (about 4 KB each), with as many bytes of
    Python: the .py files in the standard library's packages (its subdirectories, tests left out),
    never the top-level files the second evaluation text is made of."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*/**/*.py") if p.is_file() and "test" not in p.relative_to(root).parts[0]
                   and "site-packages" not in p.parts)
    code = b"".join(p.read_bytes() for p in files).decode("utf-8", errors="replace")
    out, used = [], 0
    for half in halves:
        prose = half.read_text(encoding="utf-8")
        mine, used = code[used:used + len(prose)], used + len(prose)
        pairs = itertools.zip_longest(_pieces(prose), _pieces(mine), fillvalue="")
        mixed = [piece for pair in pairs for piece in pair]
        path = half.with_name(half.stem + "_code.txt")
        path.write_text("".join(mixed), encoding="utf-8")
        out.append(path)
    return out[0], out[1]


def _pieces(text: str, size: int = 4096) -> list[str]:
    """text cut at the first line end after every `size` characters."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def stdlib_text(work: Path) -> tuple[Path, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    out = work / "stdlib.txt"
    out.write_bytes(b"".join(p.read_bytes() for p in files))
    return out, f"the {len(files)} .py files directly under {root}, concatenated in sorted name order"


def imatrix_from_covariance(cov: Path, out: Path) -> None:
    """The imatrix of the same calibration: the covariance's diagonal is what llama-imatrix stores
    (tests/test_covariance.py checks it), so no second decoding pass is needed."""
    from nkat_gguf.formats.covariance import CovarianceFile
    from nkat_gguf.formats.imatrix import write_imatrix

    c = CovarianceFile(cov)
    write_imatrix(out, {name: c.diagonal(name) for name in c.users}, chunks=c.chunk_count, chunk_size=c.chunk_size)


def layer_sweep(reference: str, cov_a: str, cov_b: str, types: list[str], damps: list[float], every: int,
                lock: str | None) -> dict:
    """Layer-level output error ratios under the held-out covariance (see the module doc)."""
    from nkat_gguf.formats.covariance import CovarianceFile, block_of
    from nkat_gguf.formats.gguf_io import ModelFile

    model, A, B = ModelFile(reference), CovarianceFile(cov_a), CovarianceFile(cov_b)
    names = [n for n in A.users if n in B and block_of(n) % every == 0]
    table: dict[str, dict] = {}
    with locked(lock):  # one locked step (a few minutes on the demo model)
        for qtype in types:
            table_row = _sweep_type(model, A, B, names, qtype, damps)
            if table_row:
                table[qtype] = table_row
    return table


def _sweep_type(model, A, B, names: list[str], qtype: str, damps: list[float]) -> dict | None:
    from nkat_gguf.runtime import ggml_quants as gq
    from nkat_gguf.runtime import kquant_codes
    from nkat_gguf.runtime.gptq import gptq_quantize_matrix, output_error

    sums = {"imatrix": 0.0, **{f"gptq damp={d:g}": 0.0 for d in damps}, "gptq left-to-right": 0.0,
            "gptq whole blocks": 0.0}
    fitting = [n for n in names if gq.fits_rows(qtype, model.shape(n)[1])]
    if not fitting:
        return None

    def gptq_error(W, RA, RB, **how) -> float:
        """Output error under RB of W quantized by GPTQ under RA (gptq_quantize_matrix's keywords)."""
        return output_error(W, gq.dequantize_rows(qtype, gptq_quantize_matrix(W, RA, qtype, **how), W.shape[1]), RB)

    for name in fitting:
        W = model.dequantize(name)
        RA, RB = A.autocorrelation(name), B.autocorrelation(name)
        sums["imatrix"] += output_error(W, gq.roundtrip(qtype, W, np.diag(RA).astype(np.float32)), RB)
        for d in damps:
            sums[f"gptq damp={d:g}"] += gptq_error(W, RA, RB, damp=d)
    ratios = {k: v / sums["imatrix"] for k, v in sums.items() if k.startswith("gptq damp")}
    best = min(damps, key=lambda d: ratios[f"gptq damp={d:g}"])
    for name in fitting:  # the order of importance against left to right, at the best damping
        W = model.dequantize(name)
        RA, RB = A.autocorrelation(name), B.autocorrelation(name)
        sums["gptq left-to-right"] += gptq_error(W, RA, RB, damp=best, by_importance=False)
        if kquant_codes.layout(qtype) is not None:  # k-quants: ggml's codes per block, no column step
            sums["gptq whole blocks"] += gptq_error(W, RA, RB, damp=best, columns=False)
    ratios[f"gptq left-to-right damp={best:g}"] = sums["gptq left-to-right"] / sums["imatrix"]
    if sums["gptq whole blocks"]:
        ratios[f"gptq whole blocks damp={best:g}"] = sums["gptq whole blocks"] / sums["imatrix"]
    return {"matrices": len(fitting), "best_damp": best, "ratio_to_imatrix": ratios,
            "error_sums": sums}


def model_level(reference: str, qtype: str, imatrix: Path, cov: Path, damp: float, texts: dict, work: Path,
                chunks: int, threads: str, lock: str | None, steps: dict) -> dict:
    t = ["--threads", threads]
    plain, gptq = work / f"{qtype}-imatrix.gguf", work / f"{qtype}-gptq.gguf"
    steps[f"quantize {qtype} llama.cpp"] = nkat(lock, "quantize", "--input", reference, "--type", qtype,
                                                "--imatrix", str(imatrix), "--output", str(plain), *t)
    steps[f"quantize {qtype} gptq"] = g = nkat(lock, "quantize", "--input", reference, "--type", qtype, "--method",
                                               "gptq", "--covariance", str(cov), "--imatrix", str(imatrix),
                                               "--damp", f"{damp:g}", "--output", str(gptq), *t)
    from nkat_gguf.formats.gguf_io import open_gguf

    a, b = open_gguf(plain), open_gguf(gptq)
    same_layout = [(x.name, x.tensor_type, x.n_bytes) for x in a.tensors] == [(x.name, x.tensor_type, x.n_bytes)
                                                                             for x in b.tensors]
    out = {"bytes_llama": plain.stat().st_size, "bytes_gptq": gptq.stat().st_size, "same_types_and_bytes": same_layout,
           "gptq_matrices": len(g["gptq_tensors"]), "gptq_seconds": g["_seconds"],
           "tensor_types": steps[f"quantize {qtype} llama.cpp"]["tensor_types"], "texts": {}}
    for label, text in texts.items():
        ppl = nkat(lock, "ppl", "--model", str(plain), "--model", str(gptq), "--reference", reference, "--text",
                   str(text), "--chunks", str(chunks), "--ctx", "512", *t)
        steps[f"ppl {qtype} {label}"] = ppl
        by_label = {r["label"]: r for r in ppl["rows"]}
        rows = [by_label[plain.name], by_label[gptq.name]]
        kld = [rows[0]["kld_mean"], rows[1]["kld_mean"]]
        out["texts"][label] = {"kld_llama": kld[0], "kld_gptq": kld[1], "kld_ratio": kld[1] / kld[0],
                               "ppl_llama": rows[0]["ppl"], "ppl_gptq": rows[1]["ppl"],
                               "ppl_reference": ppl.get("ppl_reference"),
                               "top1_llama": rows[0].get("top1_agreement"), "top1_gptq": rows[1].get("top1_agreement")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", default=str(default_model_path()),
                    help="the model quantized (default: the embedded SmolLM2-135M Q4_1)")
    ap.add_argument("--types", default="q4_0", help="llama.cpp types for the model level (default q4_0)")
    ap.add_argument("--sweep-types", default="q4_0,q5_0,q2_k,q3_k,q4_k,iq4_nl",
                    help="types of the layer-level damping sweep (only matrices whose rows fit the type)")
    ap.add_argument("--damps", default="0.001,0.01,0.03,0.1,0.3", help="damping fractions swept")
    ap.add_argument("--damp", type=float, help="write the files with this damping instead of the sweep's best")
    ap.add_argument("--sweep-every", type=int, default=3, help="sweep on the matrices of every N-th block (default 3)")
    ap.add_argument("--work", default="/tmp/nkat-bench-gptq")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of ctx 512 per text (default 8)")
    ap.add_argument("--calib-chunks", type=int, default=32, help="chunks of ctx 512 per calibration half (default 32)")
    ap.add_argument("--calib-text", default=str(SHARED / "wikitext-2" / "wiki.valid.tokens"),
                    help="WikiText-2 valid (split into the calibration and the held-out halves)")
    ap.add_argument("--calib-code", action="store_true",
                    help="interleave each calibration half with as much Python from the standard library's "
                         "packages (never the top-level files the second text is made of)")
    ap.add_argument("--eval-text", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"), help="WikiText-2 test")
    ap.add_argument("--second-text", help="second evaluation text (default: CPython's standard-library sources)")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--lock", help="run each heavy step under an exclusive flock on this file")
    ap.add_argument("--reuse", action="store_true",
                    help="keep calibration files already in --work (made by an earlier run with the same settings)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lock, t = args.lock, ["--threads", args.threads]
    steps: dict[str, dict] = {}
    valid_a, valid_b = split_valid(Path(args.calib_text), work)
    if args.calib_code:
        valid_a, valid_b = code_calibration((valid_a, valid_b))
    if args.second_text:
        second, second_name = Path(args.second_text), str(Path(args.second_text).resolve())
    else:
        second, second_name = stdlib_text(work)
    texts = {"wikitext2-test": Path(args.eval_text), "second": second}

    imatrix, cov_a, cov_b = work / "valid_a.imatrix", work / "valid_a.cov", work / "valid_b.cov"
    c = ["--model", args.reference, "--chunks", str(args.calib_chunks), *t]

    def calibrate(label: str, out: Path, *extra: str) -> None:
        if args.reuse and out.exists():
            return
        steps[label] = nkat(lock, "calibrate", *extra, *c, "--output", str(out))

    calibrate("calibrate covariance A", cov_a, "--covariance", "--text", str(valid_a))
    imatrix_from_covariance(cov_a, imatrix)
    damps = [float(x) for x in args.damps.split(",") if x]
    sweep = {}
    if damps:
        calibrate("calibrate covariance B", cov_b, "--covariance", "--text", str(valid_b))
        started = time.perf_counter()
        sweep = layer_sweep(args.reference, str(cov_a), str(cov_b), args.sweep_types.split(","), damps,
                            args.sweep_every, lock)
        sweep["_seconds"] = time.perf_counter() - started
    first = next((v for k, v in sweep.items() if not k.startswith("_")), None)
    damp = args.damp if args.damp is not None else (first["best_damp"] if first else 0.01)

    models = {}
    for q in (q for q in args.types.split(",") if q):  # one locked step per type: quantize twice, score twice
        with locked(lock):
            models[q] = model_level(args.reference, q, imatrix, cov_a, damp, texts, work, args.chunks, args.threads,
                                    None, steps)
    result = {
        "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "reference": args.reference,
        "calibration": f"WikiText-2 valid, first half ({args.calib_chunks} chunks of 512)",
        "held_out": f"WikiText-2 valid, second half ({args.calib_chunks} chunks of 512)",
        "second_text": second_name, "chunks": args.chunks, "damp_used": damp,
        "layer_sweep": sweep, "models": models,
        "goals": {q: {"goal": GOALS.get(q), "kld_ratio_test": m["texts"]["wikitext2-test"]["kld_ratio"],
                      "met": (m["texts"]["wikitext2-test"]["kld_ratio"] <= GOALS[q]) if q in GOALS else None}
                  for q, m in models.items()},
        "commands": [s["_command"] for s in steps.values()],
        "calibration_reused": [p.name for p in (imatrix, cov_a, cov_b) if args.reuse and p.exists()
                               and not any(str(p) in s["_command"] for s in steps.values())],
        "step_seconds": {k: round(s["_seconds"], 1) for k, s in steps.items()},
        "step_peak_rss_mb": {k: round(s["_peak_rss_mb"]) for k, s in steps.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['cpu']}, {result['date']}; reference {args.reference}")
    print(f"calibration: {result['calibration']}; damping chosen on: {result['held_out']}")
    for qtype, row in sweep.items():
        if qtype.startswith("_"):
            continue
        parts = ", ".join(f"{k} {v:.3f}" for k, v in row["ratio_to_imatrix"].items())
        print(f"  layer error / imatrix rounding, {qtype} ({row['matrices']} matrices): {parts}")
    print(f"files written with damp {damp:g}; second text: {second_name}")
    for qtype, m in models.items():
        print(f"  {qtype}: {m['bytes_gptq']} bytes (llama.cpp {m['bytes_llama']}), same types and bytes: "
              f"{m['same_types_and_bytes']}, {m['gptq_matrices']} matrices by GPTQ in {m['gptq_seconds']:.0f} s")
        for label, r in m["texts"].items():
            print(f"    {label}: KLD GPTQ {r['kld_gptq']:.5f} / llama.cpp imatrix {r['kld_llama']:.5f} = "
                  f"{r['kld_ratio']:.3f}x; PPL {r['ppl_gptq']:.3f} vs {r['ppl_llama']:.3f} (ref {r['ppl_reference']:.3f})")
        goal = result["goals"][qtype]
        if goal["goal"] is not None:
            print(f"    goal <= {goal['goal']}x on WikiText-2 test: {'met' if goal['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
