"""One calibration, as nkat calibrate, the quickstart and the frontier all run it: decode chunks of
a text with the native collector attached, as RuntimeSettings say, and write what it gathered:
llama.cpp's imatrix (GGUF, or the legacy .dat) or, with covariance, the input covariance file."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import BadSetting, Setting, UserError
from ..formats.imatrix import write_imatrix, write_imatrix_legacy
from .activation_stats import collect, write_covariance_file
from .settings import MIN_CTX, RuntimeSettings

IMATRIX_FORMATS = ("gguf", "dat")


def calibrate(model: str, text: bytes, dataset: str, output, chunks: int, settings: RuntimeSettings,
              quiet: bool = False, covariance: bool = False, max_memory: int | None = None,
              imatrix_format: str = "gguf") -> dict:
    """Statistics of `model` over `chunks` chunks of `text` (named `dataset` in the file) written to
    `output`; returns the run's facts (what nkat calibrate --json prints)."""
    if settings.ctx < MIN_CTX:
        raise BadSetting(Setting.CTX, f"must be at least {MIN_CTX}, not {settings.ctx}")
    if covariance:
        return write_covariance_file(model, text, dataset, output, chunks, settings.ctx, settings.threads,
                                     settings.flash_attn, quiet, max_memory)
    started = time.perf_counter()
    stats, facts = collect(model, text, chunks, settings.ctx, settings.threads, settings.flash_attn, quiet)
    if not stats:
        raise UserError(f"{model}: no block weight matrix saw any input (is it a transformer GGUF?)")
    if imatrix_format == "dat":
        write_imatrix_legacy(output, stats, dataset=dataset, chunks=facts["chunks"], chunk_size=settings.ctx)
    else:
        write_imatrix(output, stats, dataset=dataset, chunks=facts["chunks"], chunk_size=settings.ctx,
                      architecture=facts["architecture"])
    return {
        "output": str(output), "format": imatrix_format, "model": model, "text": dataset,
        "ctx": settings.ctx, "tensors": len(stats), "tokens_per_tensor": max(c for _, c in stats.values()),
        "bytes": Path(output).stat().st_size, "seconds": time.perf_counter() - started,
        "flash_attn": bool(settings.flash_attn),
    } | facts
