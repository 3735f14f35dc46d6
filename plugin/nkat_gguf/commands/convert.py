"""nkat convert: make theta for a GGUF model and write it as a .nkat adapter."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from ..util.atomic import atomic_path
from ..theta.convert import ConvertOptions, convert
from ..formats.defaults import find_eval_text
from ..errors import UserError
from ..formats.gguf_io import open_gguf_magic
from ..measure.ppl import CHEAP_CHECK_BYTES, CHECK_CHUNKS, check_theta, check_words
from ..formats.nkat_format import THETA_TYPES
from ..util.output_paths import check_output_path
from ..util.report import human_bytes, print_json, print_table, say
from ..theta.lowrank import SOURCE_TABLE, SOURCES, STRUCTURES, WEIGHT_SOURCE_EFFECT
from .common import (add_model_flag, add_output_flags, add_runtime_flags, add_text_flag, model_path, positive_int,
                     runtime_settings)

TARGET_SIZE_NOTE = ("note: --target-size is not needed and is ignored: the SVD here is a randomized range finder "
                    "(Halko et al.) on the whole matrix, holding one matrix in float32 plus (rows + cols) x 2 rank "
                    "numbers, so no matrix is too large for it (measured: 7B-shaped 4096x11008 matrices at rank 32 "
                    "within 638 MB, benchmarks/bench_convert.py)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="make theta (low-rank INT8 correction) for a GGUF model -> .nkat",
        description="Read MODEL tensor by tensor and write a .nkat file: a standard GGUF LoRA adapter "
        "holding theta for each block weight matrix, plus nkat.* metadata. Stock llama.cpp, "
        "llama-cpp-python and KoboldCpp load it unchanged.",
    )
    add_model_flag(p, "the (quantized) GGUF model theta corrects (default: embedded SmolLM2-135M-Instruct Q4_1)",
                   "--input", dest="input")
    p.add_argument("--output", required=True, help="the .nkat file to write")
    p.add_argument("--theta-rank", type=int, default=32, metavar="R", help="rank per matrix (default 32)")
    p.add_argument("--theta-gamma", type=float, default=None, metavar="G",
                   help="star-product strength, applied as 0.5*G*theta (default: "
                   + ", ".join(f"{s.name} {s.default_gamma}" for s in SOURCE_TABLE.values()) + ")")
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="; ".join(f"{s.name}: {s.summary}" for s in SOURCE_TABLE.values())
                   + ". Default: residual-cov with --covariance, residual-act with --imatrix, residual with "
                   "--reference; weight (the seed's method, measured here to break the model) only when named")
    p.add_argument("--reference", metavar="REF.gguf", help="higher-precision GGUF of the same model")
    p.add_argument("--imatrix", metavar="FILE", help="llama.cpp imatrix (GGUF or legacy .dat), e.g. from nkat calibrate")
    p.add_argument("--covariance", metavar="FILE", help="input covariance from nkat calibrate --covariance (residual-cov)")
    p.add_argument("--structure", choices=STRUCTURES, default="general",
                   help="general (any shape, default), antisymmetric (NKAT form, square only), "
                   "auto (antisymmetric where square)")
    p.add_argument("--theta-type", choices=THETA_TYPES, default="q8_0",
                   help="storage: q8_0 (INT8, default; F16 where a row is not a multiple of 32), f16, f32")
    p.add_argument("--selective-layers", nargs="+", metavar="NAME", default=[],
                   help="only these tensors (globs, several after one flag): GGUF names such as 'blk.*.attn_*', "
                   "Meta names such as layers.0.feed_forward.w1.weight or Hugging Face names such as "
                   "model.layers.0.self_attn.q_proj.weight")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-mb", type=float, default=None, metavar="X",
                        help="size limit of the .nkat file in MiB: every matrix's rank (up to 4x --theta-rank) comes "
                        "from one global greedy cut by singular value^2 per stored byte (for residual-cov the output "
                        "error removed per byte); matrices that gain too little get no tensors")
    budget.add_argument("--budget-pct", type=float, default=None, metavar="P",
                        help="the same limit as a percent of the base model file's bytes")
    p.add_argument("--max-matrices", type=positive_int, default=None, metavar="N",
                   help="with a budget: at most N matrices carry theta (fewer graph ops at run time)")
    p.add_argument("--optimize-rank", action="store_true", help="(implied by a budget; kept for old scripts)")
    p.add_argument("--target-size", type=int, default=None, metavar="N",
                   help="the guide's cap on the matrix size given to the SVD: not needed here and ignored "
                   "(the randomized SVD works on whole matrices; see the note it prints)")
    p.add_argument("--check-chunks", type=int, default=None, metavar="N",
                   help=f"score base and base + theta on N chunks before keeping the file (default "
                   f"{CHECK_CHUNKS} for models up to {CHEAP_CHECK_BYTES >> 30} GiB, else off; 0 = off)")
    add_text_flag(p, "evaluation text of the check (default: $NKAT_EVAL_TEXT or WikiText-2 test beside a checkout)")
    p.add_argument("--keep-harmful", action="store_true",
                   help="write the theta even when the check finds it makes the model worse (with a warning)")
    add_runtime_flags(p)  # the check's chunks
    add_output_flags(p)
    p.set_defaults(func=run)


NO_REFERENCE = ("no --reference: theta corrects what quantization lost, measured against a reference (a "
                "higher-precision GGUF of the same model); pass --reference REF.gguf (or make a lower-bit base "
                "from the model you have: nkat quantize --input M.gguf --output base.gguf), or ask for the "
                "seed's method by name with --source weight")


def resolve_source(args) -> str:
    """--source, or the best one the inputs allow; never the weight source unless named."""
    if args.source:
        return args.source
    if args.reference and args.covariance:
        return "residual-cov"
    if args.reference:
        return "residual-act" if args.imatrix else "residual"
    raise UserError(NO_REFERENCE)


def plan_check(args, model: str) -> tuple[int, str | None, str]:
    """(chunks, text, why): how the new theta will be checked; chunks 0 = not checked, for `why`."""
    explicit = args.check_chunks is not None
    if explicit and args.check_chunks < 0:
        raise UserError(f"--check-chunks must be 0 (off) or more, not {args.check_chunks}")
    if args.check_chunks == 0:
        return 0, None, "--check-chunks 0"
    if not explicit and Path(model).stat().st_size > CHEAP_CHECK_BYTES:
        return 0, None, (f"model over {CHEAP_CHECK_BYTES >> 30} GiB; --check-chunks {CHECK_CHUNKS} runs it, "
                         f"or nkat ppl --model {args.output} --chunks {CHECK_CHUNKS}")
    try:
        text = str(find_eval_text(args.text))
    except UserError as exc:
        if explicit or args.text:
            raise
        return 0, None, str(exc)
    return args.check_chunks or CHECK_CHUNKS, text, ""


def run_check(args, model: str, theta: str, plan) -> dict:
    chunks, text, why = plan
    if not chunks:
        return {"skipped": why}
    try:
        return check_theta(model, theta, text, chunks, runtime_settings(args))
    except UserError as exc:
        if args.check_chunks:
            raise
        return {"skipped": str(exc)}  # e.g. a model llama.cpp cannot run: said, not fatal


def run(args) -> int:
    model = model_path(args.input)
    open_gguf_magic(model)  # a wrong path is the first thing to hear about
    inputs = [model, args.reference, args.imatrix, args.covariance]
    check_output_path(args.output, inputs, "--output")  # before any work
    source = resolve_source(args)
    if args.optimize_rank and args.budget_mb is None and args.budget_pct is None:
        raise UserError("--optimize-rank needs --budget-mb X or --budget-pct P")
    opts = ConvertOptions(
        rank=args.theta_rank,
        gamma=args.theta_gamma,
        source=source,
        structure=args.structure,
        theta_type=args.theta_type,
        reference=args.reference,
        imatrix=args.imatrix,
        covariance=args.covariance,
        layers=args.selective_layers,
        budget_mb=args.budget_mb,
        budget_pct=args.budget_pct,
        max_matrices=args.max_matrices,
        quiet=args.quiet or args.json,
    )
    plan = plan_check(args, model)
    if args.target_size is not None:
        say(TARGET_SIZE_NOTE, args.quiet)  # stderr: also with --json
    with atomic_path(args.output, inputs) as tmp:  # the file appears only once it has passed the check
        result = convert(model, str(tmp), opts)
        check = run_check(args, model, str(tmp), plan)
        if check.get("harmful") and not args.keep_harmful:
            raise UserError(f"the new theta makes the model worse, {check_words(check)}: {args.output} not "
                            "written; pass --reference REF.gguf for a correction, or --keep-harmful to write it anyway")
    summary = replace(result, output=str(args.output)).to_dict() | {"check": check}
    summary["warnings"] = warnings_for(summary)
    for line in summary["warnings"]:
        print(f"nkat convert: warning: {line}", file=sys.stderr)
    if args.json:
        print_json(summary)
        return 0
    print_table(
        f"wrote {summary['output']}",
        ["what", "value"],
        [
            ("source / structure", f"{summary['source']} / {summary['structure']}"),
            ("rank / gamma", f"{summary['theta_rank']} / {summary['theta_gamma']}"),
            ("matrices with theta", f"{summary['tensors']} of {summary['matrices']}"),
            ("stored ranks", f"{summary['stored_rank_min']}..{summary['stored_rank_max']}"),
            ("theta bytes", f"{human_bytes(summary['theta_bytes'])} ({100 * summary['rho']:.2f} % of the model)"),
            ("check", check_words(check) + ("" if "skipped" in check else
                                             " (makes it WORSE)" if check["harmful"] else " (helps)")),
            ("time", f"{summary['seconds']:.1f} s, peak RSS {summary['peak_rss_mb']:.0f} MB"),
        ],
    )
    return 0


def warnings_for(summary: dict) -> list[str]:
    """What the user must hear about the file just written (also in --json)."""
    out = []
    if summary["source"] == "weight":
        out.append(f"--source weight: {WEIGHT_SOURCE_EFFECT}")
    if summary["check"].get("harmful"):
        out.append(f"{summary['output']} makes the model worse: {check_words(summary['check'])} (kept: --keep-harmful)")
    return out
