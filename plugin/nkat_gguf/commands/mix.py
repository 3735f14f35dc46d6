"""nkat mix: the best GGUF for the memory you have, loadable by every llama.cpp tool."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import Setting, UserError
from ..formats.defaults import find_eval_text
from ..recipe.candidates import CANDIDATE_TYPES, check_types
from ..recipe.build import OUTPUT_FLOOR
from ..recipe.costs import DEFAULT_ROWS
from ..recipe.fit import DEFAULT_CHUNKS as DEFAULT_FIT_CHUNKS
from ..recipe.mix import MixOptions, run_mix
from ..recipe.report import mix_markdown
from ..runtime.gptq import DEFAULT_DAMP
from ..util.atomic import write_text_atomic
from ..util.report import print_json, say, to_json
from .common import (add_output_flags, add_runtime_flags, add_text_flag, count, csv, positive_int, reference_path,
                     runtime_settings)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "mix", help="per-tensor llama.cpp types for a byte budget: one standard GGUF",
        description="Measure, for every weight tensor of REFERENCE and every type llama.cpp can write for it, "
        "the bytes and the output error E||(W_ref - W_t) x||^2 (ggml's own quantizer with the imatrix, on "
        "sampled rows), allocate the budget over tensors (convex hulls, one Lagrangian sweep), and write the "
        "GGUF with llama.cpp's quantizer and one exact --tensor-type override per tensor. The written tensor "
        "types are read back and checked against the recipe, which is saved beside the output in "
        "llama-quantize --tensor-type-file syntax. With --text the mixes and --compare stock types are scored "
        "against the reference (KLD, PPL, top-1). Everything is cached in --work-dir: rerun to resume.")
    p.add_argument("--reference", help="the model to quantize from (default: qwen from the [qwen] extra)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget-mb", type=float, metavar="MIB", help="file size in MiB")
    size.add_argument("--bpw", type=float, metavar="B", help="bits per weight (file bytes x 8 / weights)")
    size.add_argument("--like", metavar="TYPE", help="the bytes of llama.cpp's stock TYPE of this reference, e.g. Q3_K_S")
    size.add_argument("--budgets", type=csv, metavar="B,B,...",
                      help="several budgets in one run: 300 or 300MiB, 4.5bpw, or a type name; one file each "
                      "(OUT-<budget>.gguf)")
    stats = p.add_mutually_exclusive_group()
    stats.add_argument("--imatrix", metavar="FILE", help="the reference's imatrix (default: calibrate in --work-dir)")
    stats.add_argument("--covariance", metavar="FILE",
                       help="the reference's input covariances (nkat calibrate --covariance): full-covariance errors")
    p.add_argument("--calib-text", help="calibration text when calibrating (default: WikiText-2 valid)")
    p.add_argument("--calib-chunks", type=positive_int, default=8, metavar="N", help="calibration chunks (default 8)")
    p.add_argument("--work-dir", metavar="DIR", help="caches (costs, stock files, scores); default: OUT's folder")
    p.add_argument("--output", "-o", required=True, metavar="OUT.gguf", help="the GGUF to write")
    p.add_argument("--rows", type=positive_int, default=DEFAULT_ROWS, metavar="N",
                   help=f"rows sampled per tensor for the error estimate (default {DEFAULT_ROWS})")
    p.add_argument("--types", type=csv, default=list(CANDIDATE_TYPES), metavar="T,T,...",
                   help="candidate GGML types, or a preset: all (default: every type llama.cpp writes per "
                   "tensor) or fast (no i-quants, whose matmuls are the slow ones on CPU)")
    p.add_argument("--no-tie", dest="tie_gate_up", action="store_false",
                   help="let ffn_gate and ffn_up of a block take different types")
    p.add_argument("--output-floor", default=OUTPUT_FLOOR, metavar="TYPE",
                   help=f"lowest type for output.weight (default {OUTPUT_FLOOR}, the lowest llama.cpp's own "
                   "files use; 'none' lets the allocator choose freely)")
    p.add_argument("--fit-chunks", type=count, default=DEFAULT_FIT_CHUNKS, metavar="N",
                   help="calibration chunks each probe file is scored on, to fit how much each role's and depth "
                   f"quarter's output error costs in KLD (default {DEFAULT_FIT_CHUNKS}; 0: no probes, every tensor's "
                   "relative error counts alike)")
    p.add_argument("--fit-check", action="store_true",
                   help="also score 8 held-out role x depth-quarter probes and report how well the fit ranks them "
                   "(Spearman) and predicts them: a check of the fit, not needed for the file (8 more probe files, "
                   "each about 1 min on a 1.5B model on 2 cores)")
    p.add_argument("--theta", action="store_true",
                   help="offer theta as one more option per block matrix: the type plus a rank 8/16/32/64 INT8 "
                   "correction of its residual, priced in the .nkat's bytes (written beside OUT when chosen; "
                   "GGUF + .nkat stay within the budget). Prices whole-tensor SVDs: minutes on a 1.5B model. "
                   "The report says how many matrices took it; 0 is a possible answer")
    p.add_argument("--theta-layers", type=csv, default=[], metavar="GLOB,...",
                   help="with --theta: offer it only to these matrices (GGUF names, e.g. 'blk.*.attn_v.weight')")
    p.add_argument("--gptq", metavar="COV",
                   help="round every tensor llama.cpp quantizes again by GPTQ error propagation under this "
                   "covariance file (nkat calibrate --covariance), in the type the allocation chose: same types, "
                   "same bytes, a standard GGUF. Measure it on your text (docs/RESULTS.md)")
    p.add_argument("--gptq-priced", action="store_true",
                   help="with --gptq: offer GPTQ as one more option per block matrix and type instead, priced at "
                   "the type's damage times GPTQ's share on the sampled rows (20 min on a 1.5B model, cached). "
                   "Measured worse than plain --gptq on Qwen2.5-1.5B: the in-sample shares over-promise")
    p.add_argument("--gptq-damp", type=float, metavar="F",
                   help=f"with --gptq: damping lambda = F x the mean diagonal of the covariance (default {DEFAULT_DAMP:g})")
    p.add_argument("--refine", type=count, default=0, metavar="N",
                   help="per budget, N Optuna TPE trials around the allocation: each role's and depth quarter's "
                   "weight x 2 or / 2, the allocation solved again at the budget, the file written and its KLD "
                   "measured on --fit-chunks calibration chunks; the best becomes the mix (the first trial is the "
                   "unrefined one). Each trial writes and scores a file: minutes on a 1.5B model (default 0: off)")
    p.add_argument("--refine-storage", metavar="URL",
                   help="with --refine: the Optuna storage (default: SQLite in --work-dir; a PostgreSQL URL lets "
                   "workers on several machines share the trials)")
    p.add_argument("--match-speed", type=speed_ratio, nargs="?", const=1.0, metavar="RATIO",
                   help="make each mix generate at least RATIO (default 1) x as fast as the stock file nearest its "
                   "bytes (a --like budget's or a --compare type's), as predicted from each type's speed measured in "
                   "llama.cpp on this machine (a timing model of a few blocks per type: about 2 min on a 1.5B model, "
                   "cached in --work-dir). On CPU the i-quants' matmuls are slow: without it, a mix can generate at "
                   "0.6x its stock neighbour's speed")
    p.add_argument("--compare", type=csv, default=[], metavar="T,T,...",
                   help="stock llama.cpp types (made with the same imatrix) scored beside the mixes")
    p.add_argument("--score", action="store_true", help="score the mixes against the reference on --text")
    add_text_flag(p)
    p.add_argument("--chunks", type=positive_int, default=8, metavar="N", help="evaluation chunks (default 8)")
    add_runtime_flags(p)
    add_output_flags(p)
    p.set_defaults(func=run, setting_flags={Setting.GPTQ_DAMP: "--gptq-damp", Setting.GPTQ_COVARIANCE: "--gptq"})


def speed_ratio(text: str) -> float:
    """--match-speed's ratio: a number in (0, 1.5]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.95, not {text!r}") from None
    if not 0 < value <= 1.5:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1.5]: the mix's speed over its stock neighbour's")
    return value


def budgets_of(args) -> list[str]:
    if args.budgets is not None:
        if not args.budgets:
            raise UserError("--budgets: give at least one budget")
        return args.budgets
    if args.budget_mb is not None:
        return [f"{args.budget_mb}MiB"]
    if args.bpw is not None:
        return [f"{args.bpw}bpw"]
    return [args.like]


def run(args) -> int:
    quiet = args.quiet or args.json
    out = Path(args.output)
    work = Path(args.work_dir) if args.work_dir else out.parent / f"{out.stem}-work"
    opts = MixOptions(
        reference=reference_path(args.reference), output=str(out), work_dir=str(work), budgets=budgets_of(args),
        imatrix=args.imatrix, covariance=args.covariance, calib_text=args.calib_text, calib_chunks=args.calib_chunks,
        rows=args.rows, types=check_types(args.types), compare=args.compare, tie_gate_up=args.tie_gate_up,
        output_floor=None if args.output_floor.lower() == "none" else args.output_floor.upper(),
        fit_chunks=args.fit_chunks, fit_check=args.fit_check, theta=args.theta, theta_layers=args.theta_layers,
        gptq=args.gptq, gptq_priced=args.gptq_priced,
        gptq_damp=DEFAULT_DAMP if args.gptq_damp is None else args.gptq_damp, refine=args.refine,
        refine_storage=args.refine_storage, match_speed=args.match_speed,
        text=str(find_eval_text(args.text)) if args.score else None, chunks=args.chunks,
        runtime=runtime_settings(args), quiet=quiet)
    if args.theta_layers and not args.theta:
        raise UserError("--theta-layers needs --theta")
    if args.gptq_damp is not None and not args.gptq:
        raise UserError("--gptq-damp needs --gptq")
    if args.gptq_priced and not args.gptq:
        raise UserError("--gptq-priced needs --gptq")
    if args.refine_storage and not args.refine:
        raise UserError("--refine-storage needs --refine")
    result = run_mix(opts)
    write_text_atomic(work / "mix.json", to_json(result))
    write_text_atomic(work / "mix.md", mix_markdown(result))
    if args.json:
        print_json(result)
        return 0
    print(mix_markdown(result))
    written = [m["output"] + (f" + {m['theta_output']}" if m["theta_output"] else "") for m in result["mixes"]]
    say(f"wrote {', '.join(written)}; report {work / 'mix.md'}", args.quiet)
    return 0
