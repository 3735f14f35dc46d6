"""nkat bench: prompt and generation throughput, latency, and theta's overhead."""

from __future__ import annotations

from ..bench import BenchOptions, benchmark, gpu_offload_available
from ..defaults import find_eval_text
from ..errors import UserError
from ..measure import PplRequest, read_text, run_ppl
from ..report import print_json, print_table
from ..runtime import BACKENDS
from .common import add_output_flags, model_path, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="throughput and latency, baseline vs NKAT",
        description="Prompt-processing tokens/s at --seq-len, generation tokens/s and per-token latency "
        "over --iterations greedy tokens. With --compare, baseline and NKAT run alternately in one "
        "process and the overhead is reported as median (min..max) over --repeats pairs.")
    p.add_argument("--model", help="GGUF model (default: embedded SmolLM2 Q4_1)")
    p.add_argument("--theta", metavar="T.nkat", help="theta to apply")
    p.add_argument("--backend", choices=BACKENDS, default="lora")
    p.add_argument("--theta-gamma", "--gamma", dest="gamma", type=float, default=None,
                   help="override the file's gamma")
    p.add_argument("--seq-len", type=positive_int, default=512, help="prompt length (default 512)")
    p.add_argument("--iterations", type=positive_int, default=100, help="generated tokens per run (default 100)")
    p.add_argument("--repeats", type=positive_int, default=3, help="runs per side (default 3)")
    p.add_argument("--compare", action="store_true", help="baseline and NKAT alternately, with overhead")
    p.add_argument("--benchmark", action="store_true", help="accepted for the seed's CLI; benchmarking is the default")
    p.add_argument("--text", help="with --compare: also measure the PPL delta on 2 chunks of this text; "
                   "prompts come from it too")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--no-cuda", action="store_true", help="force CPU (n_gpu_layers = 0)")
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    model = model_path(args.model)
    if args.compare and not args.theta:
        raise UserError("--compare needs --theta")
    text_path = str(find_eval_text(args.text)) if args.text else None
    gpu_layers = 0 if args.no_cuda or not gpu_offload_available() else 999
    opts = BenchOptions(seq_len=args.seq_len, iterations=args.iterations, repeats=args.repeats,
                        threads=args.threads, n_gpu_layers=gpu_layers, quiet=args.quiet or args.json)
    result = benchmark(model, args.theta, args.backend, args.gamma, opts, args.compare,
                       text=read_text(text_path) if text_path else None)
    if args.compare and text_path:
        ppl = run_ppl(PplRequest(models=[model], text=text_path, thetas=[args.theta], gamma=args.gamma,
                                 backend=args.backend, chunks=2, threads=args.threads, quiet=True))
        result["ppl_baseline"] = ppl["ppl_base"]
        result["ppl_nkat"] = ppl["ppl"]
        result["ppl_delta"] = ppl["ppl"] - ppl["ppl_base"]
        result["ppl_chunks"] = 2
    if args.json:
        print_json(result)
        return 0
    rows = []
    for label in ("baseline", "nkat"):
        if label in result:
            r = result[label]
            rows.append([label, r["prompt_tokens_per_second"], r["generation_tokens_per_second"],
                         r["avg_latency_ms"], r["p50_latency_ms"], r["p95_latency_ms"]])
    note = f"device {result['device']}, {args.repeats} runs per side, seq-len {args.seq_len}, {args.iterations} generated tokens"
    if result.get("overhead"):
        g, pp = result["overhead"]["generation_percent"], result["overhead"]["prompt_percent"]
        note += (f"\noverhead: generation {g['median']:+.1f} % ({g['min']:+.1f}..{g['max']:+.1f}), "
                 f"prompt {pp['median']:+.1f} % ({pp['min']:+.1f}..{pp['max']:+.1f})")
    if "ppl_delta" in result:
        note += f"\nPPL on 2 chunks: baseline {result['ppl_baseline']:.3f}, NKAT {result['ppl_nkat']:.3f} ({result['ppl_delta']:+.3f})"
    print_table("throughput", ["run", "prompt tok/s", "gen tok/s", "avg ms/token", "p50 ms", "p95 ms"], rows, note=note)
    return 0
