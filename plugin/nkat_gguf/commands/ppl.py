"""nkat ppl: perplexity (as llama-perplexity), KL-divergence, top-1 agreement and TPE."""

from __future__ import annotations

from ..formats.defaults import find_eval_text
from ..measure.ppl import PplRequest, run_ppl
from ..measure.byte_control import verdict_line
from ..util.report import human_bytes, print_json, print_table
from .common import (add_model_flag, add_models_dir_flag, add_output_flags, add_runtime_flags, add_text_flag,
                     model_and_thetas, runtime_settings)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ppl", help="perplexity, KL-divergence and TPE of a model with/without theta",
        description="Score MODEL (with --theta: with and without it) exactly as llama.cpp's perplexity "
        "tool does: non-overlapping chunks of --ctx tokens, second half of each scored. With "
        "--reference also KL-divergence, top-1 agreement and the share of the gap theta recovers. "
        "Several --model files (or --compare-with) put byte-matched alternatives side by side.")
    add_model_flag(p, "model to score; repeat to compare (default: embedded SmolLM2 Q4_1). A .nkat stands "
                   "for its base model (found from its metadata) with it as --theta",
                   action="append", default=None, metavar="MODEL.gguf")
    p.add_argument("--compare-with", action="append", default=[], metavar="OTHER.gguf",
                   help="another model scored on the same chunks (e.g. the next quant type at similar bytes)")
    p.add_argument("--theta", action="append", default=[], metavar="T.nkat",
                   help="theta for the first --model; repeat to compare several")
    p.add_argument("--gamma", "--theta-gamma", dest="gamma", type=float, default=None,
                   help="override the file's gamma at run time")
    p.add_argument("--reference", metavar="REF.gguf", help="reference model for KLD / gap recovered")
    add_text_flag(p)
    p.add_argument("--chunks", type=int, default=None, metavar="N", help="score the first N chunks (default: all)")
    add_models_dir_flag(p)
    add_runtime_flags(p, backend=True)
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    model, thetas, others = model_and_thetas(args.model, args.theta, args.models_dir)
    models = [model] + others + list(args.compare_with)
    req = PplRequest(models=models, text=str(find_eval_text(args.text)), thetas=thetas, gamma=args.gamma,
                     reference=args.reference, chunks=args.chunks, runtime=runtime_settings(args),
                     quiet=args.quiet or args.json)
    result = run_ppl(req)
    if args.json:
        print_json(result)
    else:
        print_ppl_table(result)
    return 0


def print_ppl_table(result: dict) -> None:
    s = result["settings"]
    has_ref = "ppl_reference" in result
    columns = ["model", "bytes", "PPL", "±", "TPE"] + (["KLD mean", "KLD p99", "top-1", "gap recovered"] if has_ref else [])
    rows = []
    for r in result["rows"]:
        row = [r["label"], human_bytes(r["bytes"]), r["ppl"], r["ppl_err"], r["tpe"]]
        if has_ref:
            gap = r.get("gap_recovered")
            row += [r.get("kld_mean"), r.get("kld_p99"), r.get("top1_agreement"),
                    f"{100 * gap:.1f} %" if gap is not None else "-"]
        rows.append(row)
    note = (f"{s['chunks']} chunks x {s['n_ctx']} tokens of {s['text']}; backend {s['backend'] or '-'}, "
            f"flash attention {'on' if s['flash_attn'] else 'off'}, {s['threads']} threads; "
            f"{result['wall_seconds']:.1f} s")
    print_table("perplexity (llama-perplexity scoring)", columns, rows, note=note)
    print_verdict(result)


def print_verdict(result: dict) -> None:
    """Plain words: does theta help, and does a plain model at the same bytes do better?"""
    for r in (r for r in result["rows"] if "gamma" in r):
        gap = r.get("gap_recovered")
        delta = r["ppl"] - result["ppl_base"]
        words = "helps" if delta < 0 else "makes it WORSE"
        line = f"{r['label']}: theta {words} (PPL {delta:+.3f}"
        line += f", {100 * gap:.1f} % of the gap to the reference recovered)" if gap is not None else ")"
        print(line)
        control = result.get("controls", {}).get(r["label"])
        if control is not None:
            print("  byte-matched control: " + verdict_line(r["label"], control))
