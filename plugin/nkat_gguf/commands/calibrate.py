"""nkat calibrate: activation statistics (llama.cpp's imatrix) from a calibration text.

The native hook (nkat_gguf.native.ActivationCollector) sums x_i^2 over every input column of
each block weight's matmul while llama.cpp decodes non-overlapping chunks of the text, the way
llama-imatrix does (BOS first in each chunk where the vocab adds one, all logits computed).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..activation_stats import collect
from ..calibration import write_imatrix, write_imatrix_legacy
from ..defaults import find_calibration_text, find_eval_text
from ..errors import UserError
from ..measure import read_text
from ..output_paths import check_output_path
from ..report import human_bytes, print_json, print_table, say
from .common import add_output_flags, add_runtime_flags, model_path, positive_int

FORMATS = ("gguf", "dat")
DEFAULT_CHUNKS = 16


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="activation statistics (llama.cpp imatrix) for activation-scaled theta",
        description="Decode chunks of a calibration text and record, for every block weight matrix, the "
        "sum of x_i^2 over its input columns and their count: llama.cpp's imatrix (GGUF by default, "
        "the older .dat with --format dat). nkat convert --source residual-act --imatrix FILE uses it. "
        "Calibrate on other text than you evaluate on (default: WikiText-2 valid; evaluation uses test).")
    p.add_argument("--model", help="GGUF model (default: embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--text", help="calibration text (default: $NKAT_CALIB_TEXT or WikiText-2 wiki.valid.tokens)")
    p.add_argument("--output", "-o", required=True, metavar="M.imatrix", help="the imatrix file to write")
    p.add_argument("--chunks", type=positive_int, default=DEFAULT_CHUNKS, metavar="N",
                   help=f"chunks of --ctx tokens to decode (default {DEFAULT_CHUNKS}; fewer if the text is short)")
    p.add_argument("--format", choices=FORMATS, default="gguf", help="gguf (default) or the legacy .dat")
    add_runtime_flags(p)
    add_output_flags(p)
    p.set_defaults(func=run)


def check_not_eval_text(text: Path) -> None:
    """Calibrating on the evaluation text would leak it into theta: refuse."""
    try:
        eval_text = find_eval_text(None)
    except UserError:
        return
    if eval_text.resolve() == text.resolve():
        raise UserError(f"{text} is the evaluation text: calibrate on other text (e.g. WikiText-2 valid)")


def run(args) -> int:
    model = model_path(args.model)
    text_path = find_calibration_text(args.text)
    check_not_eval_text(text_path)
    check_output_path(args.output, [model, text_path], "--output")
    if args.ctx < 8:
        raise UserError(f"--ctx must be at least 8, not {args.ctx}")
    quiet = args.quiet or args.json
    started = time.perf_counter()
    stats, facts = collect(model, read_text(text_path), args.chunks, args.ctx, args.threads, args.flash_attn, quiet)
    if not stats:
        raise UserError(f"{model}: no block weight matrix saw any input (is it a transformer GGUF?)")
    if args.format == "dat":
        write_imatrix_legacy(args.output, stats, dataset=str(text_path), chunks=facts["chunks"], chunk_size=args.ctx)
    else:
        write_imatrix(args.output, stats, dataset=str(text_path), chunks=facts["chunks"], chunk_size=args.ctx,
                      architecture=facts["architecture"])
    result = {
        "output": str(args.output), "format": args.format, "model": model, "text": str(text_path),
        "ctx": args.ctx, "tensors": len(stats), "tokens_per_tensor": max(c for _, c in stats.values()),
        "bytes": Path(args.output).stat().st_size, "seconds": time.perf_counter() - started,
        "flash_attn": bool(args.flash_attn),
    } | facts
    if args.json:
        print_json(result)
        return 0
    if facts["chunks"] < args.chunks:
        say(f"note: the text holds only {facts['chunks']} chunks of {args.ctx} tokens", quiet)
    print_table("calibration (imatrix)", ["", "value"], [
        ["output", f"{result['output']} ({args.format}, {human_bytes(result['bytes'])})"],
        ["weights", result["tensors"]],
        ["chunks x ctx", f"{facts['chunks']} x {args.ctx} = {result['tokens_per_tensor']} tokens per weight"],
        ["text", result["text"]],
        ["time", f"{result['seconds']:.1f} s ({facts['threads']} threads)"],
    ])
    return 0
