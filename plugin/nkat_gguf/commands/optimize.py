"""nkat optimize: an Optuna study for the theta with the best TPE against the baseline."""

from __future__ import annotations

from pathlib import Path

from ..errors import Setting
from ..formats.defaults import find_eval_text
from ..util.report import human_bytes, print_json, print_table, say
from .rerun import rerun_commands
from .common import (add_model_flag, add_models_dir_flag, add_output_flags, add_runtime_flags, add_text_flag,
                     model_and_thetas, runtime_settings)


def add_parser(subparsers) -> None:
    from ..optimize.options import DEFAULT_CHUNKS, DEFAULT_FINAL_CHUNKS, DEFAULT_STUDY_NAME, MODES

    p = subparsers.add_parser(
        "optimize", help="search source, rank, gamma, structure and tensor groups for the best TPE (Optuna)",
        description="An Optuna (TPE) study over theta's source, structure, rank, gamma and the tensor groups "
        "that carry it, maximizing TPE measured by real perplexity runs on the same chunks. Trials over "
        "--max-kld or --max-overhead are recorded but cannot win. The study lives in an SQLite file in "
        "--output-dir (rerun to resume) or in --storage (PostgreSQL: several machines, one study). "
        "The best trial is written as optimal_rank{R}_gamma{G}.nkat only when it beats the baseline.",
    )
    add_model_flag(p, "the quantized model theta corrects (default: embedded SmolLM2-135M-Instruct Q4_1); a "
                   ".nkat stands for its base model, found from its metadata", metavar="BASE.gguf")
    p.add_argument("--reference", metavar="REF.gguf",
                   help="higher-precision GGUF of the same model: enables the residual sources and KLD")
    p.add_argument("--imatrix", metavar="FILE", help="llama.cpp imatrix: enables the residual-act source")
    p.add_argument("--covariance", metavar="FILE",
                   help="input covariance (nkat calibrate --covariance): enables the residual-cov source")
    add_text_flag(p)
    p.add_argument("--mode", choices=["quick", "full", "custom"], default="quick",
                   help=f"quick = {MODES['quick']} trials, full = {MODES['full']}, custom = --trials (default quick)")
    p.add_argument("--trials", type=int, default=None, metavar="N", help="trials for --mode custom")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the study's files go")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna RDB storage URL, e.g. postgresql://user:pw@host/db (default: sqlite in --output-dir)")
    p.add_argument("--study-name", default=DEFAULT_STUDY_NAME, metavar="NAME",
                   help=f"study to create or resume (default {DEFAULT_STUDY_NAME!r})")
    p.add_argument("--target-rank", type=int, default=None, metavar="R",
                   help="fix the rank instead of searching it (the guide's flag)")
    p.add_argument("--max-kld", type=float, default=None, metavar="X",
                   help="trials with mean KL-divergence above X are infeasible (needs --reference)")
    p.add_argument("--max-overhead", type=float, default=None, metavar="PCT",
                   help="trials whose decode time exceeds the baseline's by more than PCT %% are infeasible")
    p.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, metavar="N",
                   help=f"chunks every trial is scored on (default {DEFAULT_CHUNKS})")
    p.add_argument("--final-chunks", type=int, default=DEFAULT_FINAL_CHUNKS, metavar="N",
                   help=f"re-evaluate the best trial on this many chunks at the end (default {DEFAULT_FINAL_CHUNKS}; 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: random; give each worker its own)")
    add_models_dir_flag(p)
    add_runtime_flags(p, backend=True)
    add_output_flags(p)
    p.set_defaults(func=run, setting_flags={
        Setting.THETA_RANK: "--target-rank", Setting.FINAL_CHUNKS: "--final-chunks", Setting.MAX_KLD: "--max-kld",
        Setting.MAX_OVERHEAD: "--max-overhead", Setting.STUDY_NAME: "--study-name", Setting.MODE: "--mode",
        Setting.TRIALS: "--trials"})


def run(args) -> int:
    from ..optimize.options import OptimizeOptions
    from ..optimize.study import run_optimize

    model, given, _ = model_and_thetas([args.model], [], args.models_dir)
    if given:
        say(f"{args.model}: optimizing theta for its base model {model}; the final check scores "
            f"{args.model} beside the best trial", args.quiet or args.json)
    opts = OptimizeOptions(
        model=model, output_dir=args.output_dir, text=str(find_eval_text(args.text)),
        reference=args.reference, imatrix=args.imatrix, covariance=args.covariance, mode=args.mode, trials=args.trials,
        storage=args.storage, study_name=args.study_name, target_rank=args.target_rank,
        max_kld=args.max_kld, max_overhead=args.max_overhead, chunks=args.chunks, final_chunks=args.final_chunks,
        runtime=runtime_settings(args), seed=args.seed,
        quiet=args.quiet or args.json, given_theta=given[0] if given else None,
    )
    summary = run_optimize(opts, rerun_commands)
    if args.json:
        print_json(summary)
    else:
        print_summary(summary)
    return 0


def _pct(x):
    return f"{100 * x:.1f} %" if x is not None else "-"


def print_summary(s: dict) -> None:
    base, best, final, control = s["baseline"], s["best_trial"], s["final"], s["control"]
    columns = ["", "chunks", "PPL", "KLD mean", "TPE", "bytes", "gap recovered"]
    rows = [("baseline (no theta)", base["chunks"], base["ppl"], base["kld_mean"], base["tpe"],
             human_bytes(base["bytes"]), "-")]
    if best is not None:
        rows.append((f"best trial #{best['number']}", best["chunks"], best["ppl"], best["kld_mean"], best["tpe"],
                     human_bytes(best["bytes"]), _pct(best["gap_recovered"])))
    if control:
        rows.append((control["label"], control["chunks"], control["ppl"], 0.0, control["tpe"],
                     human_bytes(control["bytes"]), "100.0 %"))
    if final:
        fb, fbase = final["best"], final["baseline"]
        rows.append(("baseline (no theta)", final["chunks"], fbase["ppl"], fbase["kld_mean"], fbase["tpe"],
                     human_bytes(fbase["bytes"]), "-"))
        rows.append((f"best trial #{best['number']}", final["chunks"], fb["ppl"], fb["kld_mean"], fb["tpe"],
                     human_bytes(fb["bytes"]), _pct(fb["gap_recovered"])))
        if final.get("reference"):
            rows.append(("reference", final["chunks"], final["reference"]["ppl"], 0.0, None, "-", "100.0 %"))
        if final.get("given"):
            g = final["given"]
            rows.append((f"given {Path(g['theta']).name}", final["chunks"], g["ppl"], g["kld_mean"], g["tpe"],
                         human_bytes(g["bytes"]), "-"))
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(s["trials"].items()))
    spt = s["seconds_per_trial"]
    note = (f"study {s['study_name']!r} ({s['storage']}): {counts}; "
            f"{spt:.1f} s per trial" if spt else f"study {s['study_name']!r} ({s['storage']}): {counts}")
    print_table("nkat optimize: baseline vs best", columns, rows, note=note)
    if best is not None:
        p = best["params"]
        print(f"best parameters: source {p['source']}, structure {p['structure']}, rank {p['rank']}, "
              f"gamma {p['gamma']:.3f}, groups {' '.join(p['groups'])}")
    print(s["verdict"])
    written = ["optimization_history.json", "optuna_study.json"] + ([s["plot"]] if s.get("plot") else [])
    print(f"wrote {', '.join(s['files'] + written)} in {s['output_dir']}"
          + ("" if s["files"] else " (no optimal_* file: nothing beat the baseline)"))
