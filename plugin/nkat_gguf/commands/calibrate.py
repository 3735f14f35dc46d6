"""nkat calibrate: activation statistics (llama.cpp's imatrix) from a calibration text.

The native hook (nkat_gguf.runtime.native.ActivationCollector) sums x_i^2 over every input column of
each block weight's matmul while llama.cpp decodes non-overlapping chunks of the text, the way
llama-imatrix does (BOS first in each chunk where the vocab adds one, all logits computed).
With --covariance it records the full sum of x x^T per distinct input instead
(nkat_gguf.runtime.native.CovarianceCollector, file format in nkat_gguf.formats.covariance), a group of blocks
per pass over the text so that the sums fit in --max-memory.
"""

from __future__ import annotations

from pathlib import Path

from ..runtime.activation_stats import MemoryLimitError
from ..runtime.calibrate import IMATRIX_FORMATS, calibrate
from ..formats.defaults import find_calibration_text, find_eval_text
from ..errors import Setting, UserError
from ..measure.ppl import read_text
from ..util.output_paths import check_output_path
from ..util.report import human_bytes, print_json, print_table, say
from .common import (add_model_flag, add_output_flags, add_runtime_flags, add_text_flag, byte_size, model_path,
                     positive_int, runtime_settings)

DEFAULT_CHUNKS = 16
# Covariance sums held at once: the 1.5B model's 28 blocks need 19.6 GB in all (one 8960-wide
# input is 640 MB), so 8 GiB means a few passes and leaves a 24 GB machine two thirds free.
DEFAULT_MAX_MEMORY = "8G"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="activation statistics (llama.cpp imatrix) for activation-scaled theta",
        description="Decode chunks of a calibration text and record, for every block weight matrix, the "
        "sum of x_i^2 over its input columns and their count: llama.cpp's imatrix (GGUF by default, "
        "the older .dat with --format dat). nkat convert --source residual-act --imatrix FILE uses it. "
        "Calibrate on other text than you evaluate on (default: WikiText-2 valid; evaluation uses test).")
    add_model_flag(p, "GGUF model (default: embedded SmolLM2-135M-Instruct Q4_1)")
    add_text_flag(p, "calibration text (default: $NKAT_CALIB_TEXT or WikiText-2 wiki.valid.tokens)")
    p.add_argument("--output", "-o", required=True, metavar="M.imatrix", help="the imatrix file to write")
    p.add_argument("--chunks", type=positive_int, default=DEFAULT_CHUNKS, metavar="N",
                   help=f"chunks of --ctx tokens to decode (default {DEFAULT_CHUNKS}; fewer if the text is short)")
    p.add_argument("--format", choices=IMATRIX_FORMATS, default="gguf", help="gguf (default) or the legacy .dat")
    p.add_argument("--covariance", action="store_true",
                   help="record the full input covariance (sum of x x^T per distinct matmul input) for "
                   "--source residual-cov, instead of the imatrix diagonal")
    p.add_argument("--max-memory", type=byte_size, default=byte_size(DEFAULT_MAX_MEMORY), metavar="SIZE",
                   help=f"with --covariance: most memory for the sums at once, e.g. 3G (default {DEFAULT_MAX_MEMORY}); "
                   "blocks that do not fit are collected in further passes over the text (the model comes on top)")
    add_runtime_flags(p)
    add_output_flags(p)
    p.set_defaults(func=run, setting_flags={Setting.CALIB_TEXT: "--text"})


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
    if args.covariance and args.format != "gguf":
        raise UserError("--covariance writes its own GGUF format: drop --format dat")
    quiet = args.quiet or args.json
    try:
        result = calibrate(model, read_text(text_path), str(text_path), args.output, args.chunks,
                           runtime_settings(args), quiet, args.covariance, args.max_memory, args.format)
    except MemoryLimitError as exc:
        raise UserError(f"--max-memory: {exc}") from None
    if args.covariance:
        return show_result(args, result, quiet, "calibration (input covariance)", [
            ["output", f"{result['output']} ({human_bytes(result['bytes'])})"],
            ["inputs / weights", f"{result['inputs']} distinct inputs for {result['weights']} weights"],
            ["chunks x ctx", f"{result['chunks']} x {args.ctx} = {result['tokens_per_input']} tokens per input"],
            ["passes", f"{result['passes']} (--max-memory {human_bytes(args.max_memory)})"],
            ["peak RSS", f"{result['peak_rss_mb']:.0f} MB"],
        ])
    return show_result(args, result, quiet, "calibration (imatrix)", [
        ["output", f"{result['output']} ({args.format}, {human_bytes(result['bytes'])})"],
        ["weights", result["tensors"]],
        ["chunks x ctx", f"{result['chunks']} x {args.ctx} = {result['tokens_per_tensor']} tokens per weight"],
    ])


def show_result(args, result: dict, quiet: bool, title: str, rows: list) -> int:
    """The JSON, or a note on a short text and the table: `rows`, then the text and the time."""
    if args.json:
        print_json(result)
        return 0
    if result["chunks"] < args.chunks:
        say(f"note: the text holds only {result['chunks']} chunks of {args.ctx} tokens", quiet)
    print_table(title, ["", "value"], rows + [
        ["text", result["text"]],
        ["time", f"{result['seconds']:.1f} s ({result['threads']} threads)"],
    ])
    return 0
