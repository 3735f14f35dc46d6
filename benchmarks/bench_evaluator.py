"""The perplexity evaluator's speed against plain llama_decode on the same chunks.

    python benchmarks/bench_evaluator.py [--chunks 4] [--ctx 512] [--model M.gguf] [--text FILE]

One process, one loaded model; plain decodes (no logits requested) and evaluator chunks
(scored logits + vectorized log-softmax + NLL) alternate chunk by chunk, so both see the same
machine load. Prints tokens/s of each and their ratio (goal: evaluator >= 0.90 of plain).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugin"))

from nkat_gguf.formats.defaults import default_model_path, find_eval_text  # noqa: E402
from nkat_gguf.measure.evaluate import Accumulator, chunk_logprobs  # noqa: E402
from nkat_gguf.runtime.engine import Runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--text", default=None)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.text, args.chunks, args.ctx, args.threads), indent=2))


def measure(model=None, text=None, chunks: int = 4, ctx: int = 512, threads: int | None = None) -> dict:
    """Plain decodes and evaluator chunks, alternating; tokens/s of each and their ratio."""
    rt = Runtime(model or default_model_path(), n_ctx=ctx, n_threads=threads)
    try:
        tokens = rt.tokenize(Path(find_eval_text(text)).read_bytes())
        plain_s = eval_s = 0.0
        acc = Accumulator()
        rt.decode(tokens[:32], 0)  # warm-up
        for c in range(chunks):
            window = tokens[c * ctx:(c + 1) * ctx]
            rt.clear()
            t0 = time.perf_counter()
            rt.decode(window, 0, logits_from=None)
            plain_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            logp, targets = chunk_logprobs(rt, tokens, ctx, c)
            acc.add(logp, targets, None)
            eval_s += time.perf_counter() - t0
    finally:
        rt.close()
    n = chunks * ctx
    return {"chunks": chunks, "ctx": ctx, "plain_decode_tokens_per_second": n / plain_s,
            "evaluator_tokens_per_second": n / eval_s, "ratio": plain_s / eval_s, "ppl": acc.result()["ppl"]}


if __name__ == "__main__":
    main()
