"""Activation statistics: run a model over a text with the native collector attached.

Per block weight, the sum of x_i^2 over every input column of its matmul and the column count,
over non-overlapping chunks (BOS first where the vocab adds one), as llama-imatrix collects them.
"""

from __future__ import annotations

from ..errors import BadSetting, Setting, UserError
from ..util.report import progress
from .chunks import chunk_window


def collect(model: str, text: bytes, chunks: int, ctx: int, threads: int | None, flash_attn: bool,
            quiet: bool) -> tuple[dict, dict]:
    """Run the model over `chunks` chunks with the collector attached; (stats, run facts)."""
    from ..formats.gguf_io import ModelFile
    from .native import ActivationCollector
    from .engine import Runtime

    model_file = ModelFile(model)
    collector = ActivationCollector({name: model_file.shape(name)[1] for name in model_file.target_names()})
    runtime = Runtime(model, None, n_ctx=ctx, n_threads=threads, flash_attn=flash_attn, eval_callback=collector)
    try:
        collector.set_threads(runtime.n_threads)
        windows, available, n_tokens = calibration_windows(runtime, text, chunks, ctx)
        for window in progress(windows, desc="calibrate", unit="chunk", quiet=quiet):
            runtime.clear()
            runtime.decode(window, 0, logits_from=0)
            collector.check()
        facts = {"chunks": len(windows), "chunks_available": available, "text_tokens": n_tokens,
                 "architecture": model_file.architecture, "threads": runtime.n_threads}
        stats = collector.results()
    finally:
        runtime.close()
        collector.close()
    return stats, facts


# ------------------------------------------------------------------ covariance -------------

class MemoryLimitError(UserError):
    """The statistics of one block do not fit the memory limit."""


def plan_passes(block_bytes: list[tuple[int, int]], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of blocks whose collectors fit in max_bytes together.

    block_bytes: (block index, bytes its collector holds), in order."""
    groups, current, used = [], [], 0
    for block, size in block_bytes:
        if size > max_bytes:
            raise MemoryLimitError(
                f"one block's covariance needs {size / 2**20:.0f} MiB, more than the memory limit of "
                f"{max_bytes / 2**20:.0f} MiB")
        if current and used + size > max_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(block)
        used += size
    if current:
        groups.append(current)
    return groups


def calibration_windows(runtime, text: bytes, chunks: int, ctx: int) -> tuple[list, int, int]:
    """The first `chunks` chunk windows of the text; (windows, chunks available, text tokens)."""
    tokens = runtime.tokenize(text)
    available = len(tokens) // ctx
    if available < 1:
        raise BadSetting(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of", Setting.CTX, str(ctx))
    windows = [chunk_window(runtime, tokens, ctx, c) for c in range(min(chunks, available))]
    return windows, available, int(len(tokens))


def collect_covariance(model: str, text: bytes, chunks: int, ctx: int, threads: int | None, flash_attn: bool,
                       quiet: bool, max_bytes: int):
    """Sum x x^T per distinct matmul input over `chunks` chunks, a group of blocks per pass so that
    the sums of one pass fit in max_bytes.

    A generator: first the run facts (chunks, inputs {name: n_in} in block order, users
    {weight: input}, passes, ...) once the text is tokenized, then (input, sum of x x^T, count)
    for every input in that order, each as soon as its pass ends."""
    from ..formats.covariance import block_of, input_of
    from ..formats.gguf_io import ModelFile
    from .native import CovarianceCollector
    from .engine import Runtime

    model_file = ModelFile(model)
    names = model_file.target_names()
    users = input_of(names)
    owners = sorted(dict.fromkeys(users.values()), key=block_of)  # stable: file order within a block
    inputs = {owner: model_file.shape(owner)[1] for owner in owners}
    blocks = list(dict.fromkeys(block_of(n) for n in owners))
    by_block = {b: {n: inputs[n] for n in owners if block_of(n) == b} for b in blocks}
    groups = plan_passes([(b, CovarianceCollector.bytes_needed(by_block[b], ctx)) for b in blocks], max_bytes)

    windows = None
    for number, group in enumerate(groups, 1):
        targets = {n: size for b in group for n, size in by_block[b].items()}
        collector = CovarianceCollector(targets, columns=ctx)
        try:
            runtime = Runtime(model, None, n_ctx=ctx, n_threads=threads, flash_attn=flash_attn,
                              eval_callback=collector)
            try:
                collector.set_threads(runtime.n_threads)
                if windows is None:
                    windows, available, n_tokens = calibration_windows(runtime, text, chunks, ctx)
                    yield {"chunks": len(windows), "chunks_available": available, "text_tokens": n_tokens,
                           "architecture": model_file.architecture, "threads": runtime.n_threads,
                           "passes": len(groups), "inputs": inputs, "users": users}
                desc = f"covariance pass {number}/{len(groups)} (blocks {group[0]}-{group[-1]})"
                for window in progress(windows, desc=desc, unit="chunk", quiet=quiet):
                    runtime.clear()
                    runtime.decode(window, 0, logits_from=0)
                    collector.check()
                    collector.add_captured()
            finally:
                runtime.close()
            results = collector.results()
            for name in targets:
                if name not in results:
                    raise UserError(f"{model}: {name} saw no input while decoding (is it used by the graph?)")
                yield (name, *results[name])
            del results
        finally:
            collector.close()


def write_covariance_file(model: str, text: bytes, text_name: str, output, chunks: int, ctx: int,
                          threads: int | None, flash_attn: bool, quiet: bool, max_bytes: int) -> dict:
    """collect_covariance written to a covariance file (atomically); the run facts, timed, with peak RSS."""
    import resource
    import time
    from pathlib import Path

    from ..formats.covariance import covariance_writer

    started = time.perf_counter()
    stream = collect_covariance(model, text, chunks, ctx, threads, flash_attn, quiet, max_bytes)
    facts = next(stream)
    tokens = 0
    with covariance_writer(output, facts["inputs"], facts["users"], [text_name], facts["chunks"], ctx,
                           facts["architecture"]) as write:
        for name, total, count in stream:
            write(name, total, count)
            tokens = count
    return {
        "output": str(output), "format": "covariance", "model": model, "text": text_name,
        "ctx": ctx, "chunks": facts["chunks"], "chunks_available": facts["chunks_available"],
        "inputs": len(facts["inputs"]), "weights": len(facts["users"]), "tokens_per_input": tokens,
        "passes": facts["passes"], "max_memory_bytes": max_bytes,
        "bytes": Path(output).stat().st_size, "seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": facts["threads"], "flash_attn": bool(flash_attn),
    }

