"""nkat quickstart: the main job on the embedded default model."""

from __future__ import annotations

from pathlib import Path

from ..formats.defaults import find_eval_text
from ..jobs.quickstart import default_work_dir, quickstart
from ..util.report import print_json
from .common import add_output_flags, add_runtime_flags, add_text_flag, positive_int, runtime_settings
from .ppl import print_ppl_table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart", help="the whole job on the embedded SmolLM2-135M: quantize, theta, measure",
        description="Make a Q4_0 copy of the embedded SmolLM2-135M-Instruct Q4_1 with llama.cpp's "
        "quantizer, compute theta (rank-32 residual; activation-scaled too when the native shim "
        "can calibrate), and score base / base + theta / reference on the same WikiText-2 chunks.")
    add_text_flag(p)
    p.add_argument("--work-dir", type=Path, default=None, help=f"where files go (default {default_work_dir()})")
    p.add_argument("--theta-rank", type=positive_int, default=32)
    p.add_argument("--chunks", type=positive_int, default=8, help="chunks scored (default 8)")
    p.add_argument("--base-type", default="q4_0", help="the lower-bit copy's type (default q4_0)")
    add_runtime_flags(p, flash_attn=False)
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    text = str(find_eval_text(args.text))
    result = quickstart(text, args.work_dir or default_work_dir(), rank=args.theta_rank, chunks=args.chunks,
                        base_type=args.base_type, runtime=runtime_settings(args), quiet=args.quiet or args.json)
    if args.json:
        print_json(result)
    else:
        print_ppl_table(result)
        print(f"files and quickstart.json in {result['work_dir']} ({result['total_seconds']:.0f} s in all)")
    return 0
