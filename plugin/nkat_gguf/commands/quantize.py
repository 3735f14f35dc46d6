"""nkat quantize: a lower-bit copy with llama.cpp's own quantizer, to make a base/reference pair;
with --method gptq, the same file with its covariance-covered matrices rounded by GPTQ propagation."""

from __future__ import annotations

from ..errors import BadSetting, Setting, UserError
from ..runtime.gptq import DEFAULT_DAMP
from ..runtime.gptq_file import gptq_quantize_model
from ..runtime.quantize import quantize_model
from ..util.report import human_bytes, print_json, print_table
from .common import add_output_flags, add_threads_flag, model_path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="lower-bit copy of a model (llama.cpp's quantizer)",
        description="Quantize REF.gguf to a lower-bit type with llama.cpp's llama_model_quantize "
        "(requantizing allowed), so one higher-precision file gives a base/reference pair. "
        "k-quants fall back to Q4_0/Q5_0/... where a row is not a multiple of 256.")
    p.add_argument("--input", help="the higher-precision model (default: embedded SmolLM2 Q4_1)")
    p.add_argument("--output", required=True, help="the GGUF file to write")
    p.add_argument("--type", default="q4_0", help="llama.cpp type, e.g. q4_0, q3_k_m, q2_k (default q4_0)")
    p.add_argument("--imatrix", metavar="FILE", help="importance-weighted quantization with this imatrix "
                   "(nkat calibrate on the input model), as community quants are made")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="per-tensor type override, e.g. 'attn_v=q6_k' (repeatable; as llama-quantize)")
    p.add_argument("--method", choices=("llama", "gptq"), default="llama",
                   help="llama: llama.cpp's quantizer (default); gptq: the same file, with every weight matrix "
                   "that has a --covariance quantized to the same type by GPTQ error propagation (ggml's own "
                   "routine per block, rounding errors pushed into the columns not yet quantized; inside "
                   "k-quant blocks column by column under ggml's scales), and token_embd, which no imatrix "
                   "covers, weighted by how the first block reads it (its attention norm's weights squared)")
    p.add_argument("--covariance", metavar="COV", help="with --method gptq: the input covariance of the input "
                   "model (nkat calibrate --covariance, on other text than you evaluate on)")
    p.add_argument("--damp", type=float, default=DEFAULT_DAMP, metavar="F",
                   help=f"with --method gptq: H = R + F * mean(diag R) * I (default {DEFAULT_DAMP})")
    add_threads_flag(p)
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    overrides = {}
    for item in args.tensor_type:
        pattern, sep, type_name = item.rpartition("=")
        if not sep or not pattern:
            raise UserError(f"--tensor-type {item!r}: expected REGEX=TYPE, e.g. attn_v=q6_k")
        overrides[pattern] = type_name
    if args.method == "gptq":
        if not args.covariance:
            raise BadSetting(Setting.QUANT_METHOD, "gptq needs", Setting.COVARIANCE, "(nkat calibrate --covariance)")
        if overrides:
            raise BadSetting(Setting.TENSOR_TYPE, "is not supported with", Setting.QUANT_METHOD, "gptq")
        result = gptq_quantize_model(model_path(args.input), args.output, args.type, args.covariance,
                                     imatrix=args.imatrix, damp=args.damp, threads=args.threads, quiet=args.quiet)
    else:
        if args.covariance:
            raise BadSetting(Setting.COVARIANCE, "is only read by", Setting.QUANT_METHOD, "gptq")
        result = quantize_model(model_path(args.input), args.output, args.type, args.threads,
                                imatrix=args.imatrix, overrides=overrides)
    if args.json:
        print_json(result)
    else:
        print_table(f"wrote {result['output']}", ["type", "tensors"], sorted(result["tensor_types"].items()),
                    note=f"{human_bytes(result['bytes'])}" + (
                        f"; {len(result['gptq_tensors'])} matrices by GPTQ" if "gptq_tensors" in result else "") + (
                        f"; token_embd weighted by {result['embedding_importance']}"
                        if result.get("embedding_importance") else ""))
    return 0
