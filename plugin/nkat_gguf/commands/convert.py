"""nkat convert: make theta for a GGUF model and write it as a .nkat adapter."""

from __future__ import annotations

from ..convert import ConvertOptions, convert
from ..nkat_format import THETA_TYPES
from ..report import human_bytes, print_json, print_table
from ..theta import SOURCE_TABLE, SOURCES, STRUCTURES
from .common import add_output_flags, model_path, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="make theta (low-rank INT8 correction) for a GGUF model -> .nkat",
        description="Read MODEL tensor by tensor and write a .nkat file: a standard GGUF LoRA adapter "
        "holding theta for each block weight matrix, plus nkat.* metadata. Stock llama.cpp, "
        "llama-cpp-python and KoboldCpp load it unchanged.",
    )
    p.add_argument("--input", "--model", dest="input", help="the (quantized) GGUF model theta corrects "
                   "(default: embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--output", required=True, help="the .nkat file to write")
    p.add_argument("--theta-rank", type=int, default=32, metavar="R", help="rank per matrix (default 32)")
    p.add_argument("--theta-gamma", type=float, default=None, metavar="G",
                   help="star-product strength, applied as 0.5*G*theta (default: "
                   + ", ".join(f"{s.name} {s.default_gamma}" for s in SOURCE_TABLE.values()) + ")")
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="; ".join(f"{s.name}: {s.summary}" for s in SOURCE_TABLE.values())
                   + " (default: residual-cov with --covariance, residual-act with --imatrix, residual with "
                   "--reference, else weight)")
    p.add_argument("--reference", metavar="REF.gguf", help="higher-precision GGUF of the same model")
    p.add_argument("--imatrix", metavar="FILE", help="llama.cpp imatrix (GGUF or legacy .dat), e.g. from nkat calibrate")
    p.add_argument("--covariance", metavar="FILE", help="input covariance from nkat calibrate --covariance (residual-cov)")
    p.add_argument("--structure", choices=STRUCTURES, default="general",
                   help="general (any shape, default), antisymmetric (NKAT form, square only), "
                   "auto (antisymmetric where square)")
    p.add_argument("--theta-type", choices=THETA_TYPES, default="q8_0",
                   help="storage: q8_0 (INT8, default; F16 where a row is not a multiple of 32), f16, f32")
    p.add_argument("--selective-layers", nargs="+", metavar="GLOB", default=[],
                   help="only tensors matching these globs, e.g. 'blk.*.attn_*' 'blk.1?.ffn_down.weight'")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-mb", type=float, default=None, metavar="X",
                        help="size limit of the .nkat file in MiB: every matrix's rank (up to 4x --theta-rank) comes "
                        "from one global greedy cut by singular value^2 per stored byte (for residual-cov the output "
                        "error removed per byte); matrices that gain too little get no tensors")
    budget.add_argument("--budget-pct", type=float, default=None, metavar="P",
                        help="the same limit as a percent of the base model file's bytes")
    p.add_argument("--max-matrices", type=positive_int, default=None, metavar="N",
                   help="with a budget: at most N matrices carry theta (fewer graph ops at run time)")
    p.add_argument("--refit-b", action="store_true",
                   help="residual-cov: refit lora_b by least squares after lora_a is rounded to --theta-type")
    p.add_argument("--optimize-rank", action="store_true", help="(implied by a budget; kept for old scripts)")
    add_output_flags(p)
    p.set_defaults(func=run)


def default_source(args) -> str:
    if args.source:
        return args.source
    if args.covariance and args.reference:
        return "residual-cov"
    if args.imatrix and args.reference:
        return "residual-act"
    return "residual" if args.reference else "weight"


def run(args) -> int:
    from ..errors import UserError

    if args.optimize_rank and args.budget_mb is None and args.budget_pct is None:
        raise UserError("--optimize-rank needs --budget-mb X or --budget-pct P")
    opts = ConvertOptions(
        rank=args.theta_rank,
        gamma=args.theta_gamma,
        source=default_source(args),
        structure=args.structure,
        theta_type=args.theta_type,
        reference=args.reference,
        imatrix=args.imatrix,
        covariance=args.covariance,
        layers=args.selective_layers,
        budget_mb=args.budget_mb,
        budget_pct=args.budget_pct,
        max_matrices=args.max_matrices,
        refit_b=args.refit_b,
        quiet=args.quiet or args.json,
    )
    summary = convert(model_path(args.input), args.output, opts)
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
            ("time", f"{summary['seconds']:.1f} s, peak RSS {summary['peak_rss_mb']:.0f} MB"),
        ],
    )
    return 0
