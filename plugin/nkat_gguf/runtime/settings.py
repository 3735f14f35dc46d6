"""How llama.cpp runs the models of one command: context, threads, flash attention, GPU layers and
the theta backend. Commands build one from their flags (commands.common.runtime_settings); every
Runtime the command opens takes it (Runtime.from_settings)."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("lora", "shim")
# The fewest tokens a chunk may hold, for scoring (positions [n_ctx/2, n_ctx-2] are scored: below
# this a chunk scores almost nothing) and for calibration alike.
MIN_CTX = 8


@dataclass(frozen=True)
class RuntimeSettings:
    ctx: int = 512               # context length: tokens per scored chunk
    threads: int | None = None   # None: all cores, at most 8 (engine.default_threads)
    flash_attn: bool = False     # off, as llama-cpp-python; llama-perplexity's 'auto' shifts PPL
    gpu_layers: int = 0          # layers offloaded to a GPU; 0 = CPU only
    backend: str = "lora"        # how theta is applied: lora | shim (BACKENDS)
