"""nkat convert: make theta for a GGUF model and write it as a .nkat adapter."""

from __future__ import annotations

from ..convert import DEFAULT_GAMMA, ConvertOptions, convert
from ..nkat_format import THETA_TYPES
from ..report import human_bytes, print_json, print_table
from ..theta import SOURCES, STRUCTURES
from .common import add_output_flags, model_path


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
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_GAMMA.items()) + ")")
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="weight: SVD of W (the seed's method); residual: SVD of W_ref - W; residual-act: "
                   "the same weighted by activation RMS from --imatrix (default: residual-act with "
                   "--imatrix, residual with --reference, else weight)")
    p.add_argument("--reference", metavar="REF.gguf", help="higher-precision GGUF of the same model")
    p.add_argument("--imatrix", metavar="FILE", help="llama.cpp imatrix (GGUF or legacy .dat), e.g. from nkat calibrate")
    p.add_argument("--structure", choices=STRUCTURES, default="general",
                   help="general (any shape, default), antisymmetric (NKAT form, square only), "
                   "auto (antisymmetric where square)")
    p.add_argument("--theta-type", choices=THETA_TYPES, default="q8_0",
                   help="storage: q8_0 (INT8, default; F16 where a row is not a multiple of 32), f16, f32")
    p.add_argument("--selective-layers", nargs="+", metavar="GLOB", default=[],
                   help="only tensors matching these globs, e.g. 'blk.*.attn_*' 'blk.1?.ffn_down.weight'")
    p.add_argument("--optimize-rank", action="store_true",
                   help="give each matrix the rank that buys the most captured energy per byte within --budget-mb")
    p.add_argument("--budget-mb", type=float, default=None, metavar="X", help="theta size budget for --optimize-rank")
    add_output_flags(p)
    p.set_defaults(func=run)


def default_source(args) -> str:
    if args.source:
        return args.source
    if args.imatrix and args.reference:
        return "residual-act"
    return "residual" if args.reference else "weight"


def run(args) -> int:
    from ..errors import UserError

    if args.optimize_rank and args.budget_mb is None:
        raise UserError("--optimize-rank needs --budget-mb X")
    opts = ConvertOptions(
        rank=args.theta_rank,
        gamma=args.theta_gamma,
        source=default_source(args),
        structure=args.structure,
        theta_type=args.theta_type,
        reference=args.reference,
        imatrix=args.imatrix,
        layers=args.selective_layers,
        budget_mb=args.budget_mb if args.optimize_rank else None,
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
            ("tensors", summary["tensors"]),
            ("stored ranks", f"{summary['stored_rank_min']}..{summary['stored_rank_max']}"),
            ("theta bytes", f"{human_bytes(summary['theta_bytes'])} ({100 * summary['rho']:.2f} % of the model)"),
            ("time", f"{summary['seconds']:.1f} s, peak RSS {summary['peak_rss_mb']:.0f} MB"),
        ],
    )
    return 0
