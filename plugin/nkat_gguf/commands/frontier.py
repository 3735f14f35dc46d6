"""nkat frontier: quality per byte. The quant ladder, nkat mix's files, theta points and their byte-matched controls."""

from __future__ import annotations

from ..errors import Setting
from ..formats.defaults import find_eval_text
from ..measure.frontier import DEFAULT_BASES, DEFAULT_BUDGETS, DEFAULT_LADDER, FrontierOptions, run_frontier
from ..measure.frontier_report import frontier_markdown, frontier_plot
from ..util.work_dir import work_dir
from ..theta.lowrank import SOURCES
from .common import (add_output_flags, add_runtime_flags, add_text_flag, byte_size, count, csv, positive_int,
                     reference_path, runtime_settings, show_outputs)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "frontier", help="quality per byte: quant ladder vs nkat mix vs theta, one run",
        description="Quantize the reference to each --ladder type (importance-weighted with an imatrix of the "
        "reference on the calibration text), make nkat mix's file at each rung's bytes, make theta for each "
        "--bases type at each --budgets size with a byte-matched control per theta point (nkat mix's file at the "
        "theta point's bytes), and score everything against the reference on the "
        "same chunks: PPL ± error, KLD mean ± error and p99, top-1, bytes. Writes JSON, a markdown table and "
        "a PNG with the Pareto frontier; prints one verdict per theta point. Every step is cached in --work-dir: "
        "rerun the same command to resume.")
    p.add_argument("--reference", help="the reference model (default: qwen from the [qwen] extra, see nkat models)")
    add_text_flag(p)
    p.add_argument("--calib-text", help="calibration text for the imatrix (default: WikiText-2 valid)")
    p.add_argument("--imatrix", metavar="FILE", help="use this imatrix of the reference instead of calibrating")
    p.add_argument("--covariance", metavar="FILE",
                   help="input covariances of the reference for --source residual-cov (nkat calibrate "
                   "--covariance); without it they are collected in --work-dir")
    p.add_argument("--max-memory", type=byte_size, default=byte_size("8G"), metavar="SIZE",
                   help="covariance sums held at once while collecting them (default 8G)")
    p.add_argument("--calib-chunks", type=positive_int, default=8, metavar="N", help="calibration chunks (default 8)")
    p.add_argument("--work-dir", required=True, metavar="DIR", help="models, thetas, caches and outputs go here")
    p.add_argument("--quant-dir", metavar="DIR", help="where ladder quantizations go / are reused (default --work-dir)")
    p.add_argument("--name", help="file-name prefix for ladder files (default: the reference's stem)")
    p.add_argument("--ladder", type=csv, default=list(DEFAULT_LADDER), metavar="T,T,...",
                   help=f"llama.cpp types (default {','.join(DEFAULT_LADDER)}; the reference is always scored). "
                   "The i-quants take minutes each on a 1.5B model on 2 cores")
    p.add_argument("--no-ladder-imatrix", dest="ladder_imatrix", action="store_false",
                   help="quantize the ladder without the imatrix (plain llama.cpp quants)")
    p.add_argument("--bases", type=csv, default=list(DEFAULT_BASES), metavar="T,T",
                   help=f"ladder types that get theta points (default {','.join(DEFAULT_BASES)})")
    p.add_argument("--budgets", type=csv, default=list(DEFAULT_BUDGETS), metavar="B,B,...",
                   help="theta sizes: percentages of the base's bytes, or 'next' = up to the next larger "
                   f"rung's bytes (default {','.join(DEFAULT_BUDGETS)})".replace("%", "%%"))
    p.add_argument("--source", choices=SOURCES, default="residual-act", help="theta source (default residual-act)")
    p.add_argument("--theta-rank", type=positive_int, default=32, metavar="R",
                   help="rank unit; the budgeted search goes up to 4R per matrix (default 32)")
    p.add_argument("--no-controls", dest="controls", action="store_false",
                   help="skip the byte-matched controls of the theta points")
    p.add_argument("--no-mixes", dest="mixes", action="store_false", help="skip nkat mix's files at the rungs' bytes")
    p.add_argument("--fit-chunks", type=count, default=FrontierOptions.fit_chunks, metavar="N",
                   help="calibration chunks per probe of nkat mix's role x depth fit, for the mixes and controls "
                   f"(default {FrontierOptions.fit_chunks}; 0: no probes)")
    p.add_argument("--chunks", type=positive_int, default=8, metavar="N", help="evaluation chunks (default 8)")
    add_runtime_flags(p, backend=True)
    add_output_flags(p)
    p.set_defaults(func=run, setting_flags={Setting.CALIB_TEXT: "--calib-text", Setting.QUANT_TYPE: "--ladder"})


def run(args) -> int:
    quiet = args.quiet or args.json
    opts = FrontierOptions(
        reference=reference_path(args.reference), text=str(find_eval_text(args.text)), work_dir=args.work_dir,
        calib_text=args.calib_text, imatrix=args.imatrix, covariance=args.covariance,
        max_memory=args.max_memory, calib_chunks=args.calib_chunks, quant_dir=args.quant_dir,
        name=args.name, ladder=args.ladder, ladder_imatrix=args.ladder_imatrix, bases=args.bases,
        budgets=args.budgets, source=args.source, theta_rank=args.theta_rank, controls=args.controls,
        mixes=args.mixes, fit_chunks=args.fit_chunks,
        chunks=args.chunks, runtime=runtime_settings(args), quiet=quiet)
    with work_dir(args.work_dir), work_dir(args.quant_dir or args.work_dir, "--quant-dir"):
        return show_outputs(args, run_frontier(opts), "frontier", frontier_markdown, frontier_plot)
