"""Activation statistics: run a model over a text with the native collector attached.

Per block weight, the sum of x_i^2 over every input column of its matmul and the column count,
over non-overlapping chunks (BOS first where the vocab adds one), as llama-imatrix collects them.
"""

from __future__ import annotations

from .errors import UserError
from .report import progress


def collect(model: str, text: bytes, chunks: int, ctx: int, threads: int | None, flash_attn: bool,
            quiet: bool) -> tuple[dict, dict]:
    """Run the model over `chunks` chunks with the collector attached; (stats, run facts)."""
    from .gguf_io import ModelFile
    from .native import ActivationCollector
    from .runtime import Runtime

    model_file = ModelFile(model)
    collector = ActivationCollector({name: model_file.shape(name)[1] for name in model_file.target_names()})
    runtime = Runtime(model, None, n_ctx=ctx, n_threads=threads, flash_attn=flash_attn, eval_callback=collector)
    try:
        collector.set_threads(runtime.n_threads)
        tokens = runtime.tokenize(text)
        available = len(tokens) // ctx
        if available < 1:
            raise UserError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}")
        n_chunks = min(chunks, available)
        for c in progress(range(n_chunks), desc="calibrate", unit="chunk", quiet=quiet):
            window = tokens[c * ctx:(c + 1) * ctx].copy()
            if runtime.add_bos:
                window[0] = runtime.bos_token
            runtime.clear()
            runtime.decode(window, 0, logits_from=0)
            collector.check()
        facts = {"chunks": n_chunks, "chunks_available": available, "text_tokens": int(len(tokens)),
                 "architecture": model_file.architecture, "threads": runtime.n_threads}
        stats = collector.results()
    finally:
        runtime.close()
        collector.close()
    return stats, facts
