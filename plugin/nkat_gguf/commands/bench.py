"""nkat bench: prompt and generation throughput, latency, and theta's overhead."""

from __future__ import annotations

from ..measure.bench import BenchOptions, benchmark, gpu_offload_available
from ..formats.defaults import find_eval_text
from ..errors import UserError
from ..measure.ppl import PplRequest, read_text, run_ppl
from ..formats.nkat_format import is_nkat_path
from ..util.report import print_json, print_table
from .common import (add_model_flag, add_models_dir_flag, add_output_flags, add_runtime_flags, add_text_flag,
                     model_and_thetas, positive_int, runtime_settings)

PPL_CHUNKS = 2  # --compare's measured perplexity change
# --benchmark: the guide's standard run, the same sizes and the built-in prompt everywhere
STANDARD_SEQ_LEN, STANDARD_ITERATIONS = 512, 100


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="throughput and latency, baseline vs NKAT",
        description="Prompt-processing tokens/s at --seq-len, generation tokens/s and per-token latency "
        "over --iterations greedy tokens. With --compare, baseline and NKAT run alternately in one "
        "process and the overhead is reported as median (min..max) over --repeats pairs.")
    add_model_flag(p, "GGUF model, or a .nkat: its base model (found from its metadata) with it as --theta "
                   "(default: embedded SmolLM2 Q4_1)")
    p.add_argument("--theta", metavar="T.nkat", help="theta to apply")
    p.add_argument("--theta-gamma", "--gamma", dest="gamma", type=float, default=None,
                   help="override the file's gamma")
    p.add_argument("--seq-len", type=positive_int, default=None, help=f"prompt length (default {STANDARD_SEQ_LEN})")
    p.add_argument("--iterations", type=positive_int, default=None,
                   help=f"generated tokens per run (default {STANDARD_ITERATIONS})")
    p.add_argument("--repeats", type=positive_int, default=3, help="runs per side (default 3)")
    p.add_argument("--compare", action="store_true", help="baseline and NKAT alternately, with overhead")
    p.add_argument("--benchmark", action="store_true",
                   help=f"the standard run, comparable between machines: seq-len {STANDARD_SEQ_LEN}, "
                   f"{STANDARD_ITERATIONS} generated tokens, the built-in prompt; other --seq-len, "
                   "--iterations or a --text are refused (the guide's flag)")
    add_text_flag(p, "prompts come from this text; with --compare the PPL change is measured on 2 chunks of "
                  "--seq-len tokens of it (default: $NKAT_EVAL_TEXT or WikiText-2 test beside a checkout)")
    add_runtime_flags(p, ctx_default=None, flash_attn=False, backend=True)
    p.add_argument("--no-cuda", action="store_true", help="force CPU (n_gpu_layers = 0)")
    add_models_dir_flag(p)
    add_output_flags(p)
    p.set_defaults(func=run)


def standard_sizes(args) -> None:
    """Fill in --seq-len and --iterations; with --benchmark, refuse anything but the standard run."""
    if args.benchmark:
        for flag, given, standard in (("--seq-len", args.seq_len, STANDARD_SEQ_LEN),
                                      ("--iterations", args.iterations, STANDARD_ITERATIONS)):
            if given not in (None, standard):
                raise UserError(f"--benchmark is the standard run with {flag} {standard}: drop {flag} {given}, "
                                "or drop --benchmark")
        if args.text:
            raise UserError("--benchmark uses the built-in prompt: drop --text, or drop --benchmark")
    args.seq_len = args.seq_len or STANDARD_SEQ_LEN
    args.iterations = args.iterations or STANDARD_ITERATIONS


def run(args) -> int:
    standard_sizes(args)
    if args.theta and is_nkat_path(args.model):
        raise UserError(f"--model {args.model} is already a theta: drop --theta, or give its base as --model")
    model, thetas, _ = model_and_thetas([args.model], [args.theta] if args.theta else [], args.models_dir)
    theta = thetas[0] if thetas else None
    if args.compare and not theta:
        raise UserError("--compare needs a theta: --theta T.nkat, or --model T.nkat")
    prompt_text = read_text(find_eval_text(args.text)) if args.text else None
    gpu_layers = 0 if args.no_cuda or not gpu_offload_available() else 999
    opts = BenchOptions(seq_len=args.seq_len, iterations=args.iterations, repeats=args.repeats,
                        runtime=runtime_settings(args, gpu_layers=gpu_layers), quiet=args.quiet or args.json)
    result = benchmark(model, theta, args.gamma, opts, args.compare, text=prompt_text)
    result["standard"] = args.benchmark
    if args.compare:
        result |= perplexity_change(model, theta, args)
    if args.json:
        print_json(result)
        return 0
    rows = []
    for label in ("baseline", "nkat"):
        if label in result:
            r = result[label]
            rows.append([label, r["prompt_tokens_per_second"], r["generation_tokens_per_second"],
                         r["avg_latency_ms"], r["p50_latency_ms"], r["p95_latency_ms"]])
    note = ("standard benchmark, " if args.benchmark else "") + f"device {result['device']}, {args.repeats} runs per side, seq-len {args.seq_len}, {args.iterations} generated tokens"
    if result.get("overhead"):
        g, pp = result["overhead"]["generation_percent"], result["overhead"]["prompt_percent"]
        note += (f"\noverhead: generation {g['median']:+.1f} % ({g['min']:+.1f}..{g['max']:+.1f}), "
                 f"prompt {pp['median']:+.1f} % ({pp['min']:+.1f}..{pp['max']:+.1f})")
    if result.get("ppl_delta") is not None:
        note += (f"\nPPL on {PPL_CHUNKS} chunks of {args.seq_len} tokens of {result['ppl_text']}: baseline {result['ppl_baseline']:.3f}, "
                 f"NKAT {result['ppl_nkat']:.3f} ({result['perplexity_change_percent']:+.2f} %)"
                 + ("" if result["ppl_delta"] < 0 else ": theta makes the model WORSE"))
    elif args.compare:
        note += f"\nperplexity change not measured: {result['ppl_skipped']}"
    print_table("throughput", ["run", "prompt tok/s", "gen tok/s", "avg ms/token", "p50 ms", "p95 ms"], rows, note=note)
    return 0


def perplexity_change(model: str, theta: str, args) -> dict:
    """The measured PPL change theta makes on PPL_CHUNKS chunks of --seq-len tokens of the evaluation
    text (the guide printed an estimated one); skipped, with the reason, when no text is found."""
    try:
        text_path = str(find_eval_text(args.text))
    except UserError as exc:
        return {"ppl_delta": None, "ppl_skipped": str(exc)}
    ppl = run_ppl(PplRequest(models=[model], text=text_path, thetas=[theta], gamma=args.gamma, chunks=PPL_CHUNKS,
                             runtime=runtime_settings(args, ctx=args.seq_len), quiet=True))
    delta = ppl["ppl"] - ppl["ppl_base"]
    return {"ppl_baseline": ppl["ppl_base"], "ppl_nkat": ppl["ppl"], "ppl_delta": delta,
            "perplexity_change": delta, "perplexity_change_percent": 100 * delta / ppl["ppl_base"],
            "ppl_chunks": PPL_CHUNKS, "ppl_ctx": args.seq_len, "ppl_text": text_path}
