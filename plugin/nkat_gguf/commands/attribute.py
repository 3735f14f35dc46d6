"""nkat attribute: what quantization cost, and where (KLD share per tensor group, with bytes)."""

from __future__ import annotations

from ..measure.attribute import AttributeOptions, run_attribution
from ..formats.defaults import find_eval_text
from ..measure.frontier_report import attribution_markdown, attribution_plot
from ..util.work_dir import work_dir
from .common import (add_model_flag, add_output_flags, add_runtime_flags, add_text_flag, csv, positive_int,
                     reference_path, runtime_settings, show_outputs)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "attribute", help="share of a quantized model's KLD each tensor group causes, and its byte cost",
        description="For each tensor group (token_embd, output, attn_q/k/v/output, ffn_gate/up/down and ranges "
        "of blocks) assemble BASE with that group restored from REFERENCE (tensors copied as stored) and score "
        "it against the reference on the same chunks: the share of the base's KL-divergence the group causes, "
        "and the bytes restoring it costs. Writes JSON, a markdown table and a bar chart (PNG) in --work-dir; "
        "results are cached there, so a rerun resumes.")
    add_model_flag(p, "the quantized model (e.g. a Q2_K of the reference)", "--base", dest="base", required=True,
                   metavar="BASE.gguf")
    p.add_argument("--reference", help="the model BASE was quantized from (default: qwen, see nkat models)")
    add_text_flag(p)
    p.add_argument("--work-dir", required=True, metavar="DIR", help="assembled models, caches and outputs go here")
    p.add_argument("--groups", type=csv, default=[], metavar="G,G,...",
                   help="groups to restore (roles like attn_q or token_embd, or block ranges like 'blk 0-6'; "
                   "default: every role and --block-parts ranges)")
    p.add_argument("--block-parts", type=positive_int, default=4, metavar="N", help="block ranges (default 4)")
    p.add_argument("--chunks", type=positive_int, default=8, metavar="N", help="evaluation chunks (default 8)")
    add_runtime_flags(p)
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    quiet = args.quiet or args.json
    opts = AttributeOptions(base=args.base, reference=reference_path(args.reference), text=str(find_eval_text(args.text)),
                            work_dir=args.work_dir, groups=args.groups, block_parts=args.block_parts, chunks=args.chunks,
                            runtime=runtime_settings(args), quiet=quiet)
    with work_dir(args.work_dir):
        return show_outputs(args, run_attribution(opts), "attribution", attribution_markdown, attribution_plot)
