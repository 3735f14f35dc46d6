"""How many bytes of model fit this machine: the free memory of the device the model will run on
(RAM, or the GPU's free VRAM when a GPU backend is chosen), minus llama.cpp's KV cache at the
chosen context and a margin for its compute buffers. `nkat kobold --fit` asks `nkat mix` for the
best file of that size."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from ...errors import UserError
from ...formats.gguf_io import field_value, open_gguf

MiB = 1 << 20
# llama.cpp's default KV cache type is F16: two bytes per stored value.
KV_BYTES_PER_VALUE = 2
# Compute buffers besides the logits. llama-cpp-python 0.3.36 on the CPU logged compute buffers of
# 98.3 / 99.4 MiB (SmolLM2-135M, ctx 512 / 4096) and 302.8 / 305.8 MiB (Qwen2.5-1.5B): the logits
# rows plus 2-9 MiB. This margin covers that with room to spare.
COMPUTE_MARGIN = 64 * MiB
# Tokens per decode batch (llama-cpp-python's n_batch default); the logits buffer holds this many rows.
BATCH = 512
# Leave this share of the free memory to the rest of the machine.
HEADROOM = 0.10


def _arch_value(reader, arch: str, key: str, default=None):
    return field_value(reader, f"{arch}.{key}", default)


def _reader(model):
    """A path is opened; an open GGUFReader is used as it is (reading the vocabulary takes seconds)."""
    return open_gguf(model) if isinstance(model, (str, Path)) else model


def kv_cache_bytes(model, n_ctx: int) -> int:
    """Bytes of llama.cpp's F16 K and V caches for n_ctx tokens: per block, n_ctx x (K width + V width)."""
    reader = _reader(model)
    arch = field_value(reader, "general.architecture")
    n_layer = _arch_value(reader, arch, "block_count")
    n_embd = _arch_value(reader, arch, "embedding_length")
    n_head = _arch_value(reader, arch, "attention.head_count")
    if not (n_layer and n_embd and n_head):
        raise UserError(f"{reader.nkat_path}: no block count, embedding width or head count for {arch}: cannot size its KV cache")
    n_head_kv = _arch_value(reader, arch, "attention.head_count_kv", n_head)
    key_len = _arch_value(reader, arch, "attention.key_length", n_embd // n_head)
    value_len = _arch_value(reader, arch, "attention.value_length", n_embd // n_head)
    return int(n_layer) * int(n_ctx) * int(n_head_kv) * (int(key_len) + int(value_len)) * KV_BYTES_PER_VALUE


def logits_bytes(model, n_ctx: int) -> int:
    """The logits buffer: one float per vocabulary entry for each row of a batch (n_ctx at most)."""
    reader = _reader(model)
    arch = field_value(reader, "general.architecture")
    vocab = _arch_value(reader, arch, "vocab_size") or len(field_value(reader, "tokenizer.ggml.tokens", []) or [])
    return int(vocab) * min(BATCH, int(n_ctx)) * 4


def available_ram() -> int:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise UserError("cannot read the free memory (/proc/meminfo); pass --fit-memory SIZE")


def available_vram() -> int | None:
    """Free memory of the first NVIDIA GPU (nvidia-smi), or None when it cannot be read."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0]) * MiB
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


@dataclass
class FreeMemory:
    device: str            # "RAM" or "VRAM"
    bytes: int
    source: str            # where the figure came from


def free_memory(on_gpu: bool, given: int | None = None) -> FreeMemory:
    """The memory the model will live in: the GPU's free VRAM when it runs on a GPU and nvidia-smi
    answers, else MemAvailable; `given` (--fit-memory) replaces the measurement."""
    if given is not None:
        return FreeMemory("VRAM" if on_gpu else "RAM", int(given), "--fit-memory")
    if on_gpu:
        vram = available_vram()
        if vram is not None:
            return FreeMemory("VRAM", vram, "nvidia-smi memory.free")
        return FreeMemory("RAM", available_ram(), "MemAvailable (a GPU backend, but nvidia-smi did not answer)")
    return FreeMemory("RAM", available_ram(), "MemAvailable")


@dataclass
class FitPlan:
    device: str            # "RAM" or "VRAM"
    free_bytes: int
    kv_cache_bytes: int
    buffers_bytes: int
    headroom_bytes: int
    budget_bytes: int      # what the model file may weigh

    def reason(self) -> str:
        return (f"{self.free_bytes / MiB:,.0f} MiB free {self.device} - KV cache {self.kv_cache_bytes / MiB:,.0f} MiB"
                f" - buffers {self.buffers_bytes / MiB:,.0f} MiB - {HEADROOM:.0%} headroom"
                f" = {self.budget_bytes / MiB:,.0f} MiB for the model")

    def to_dict(self) -> dict:
        return asdict(self) | {"reason": self.reason()}


def plan_fit(model_path: str | Path, n_ctx: int, free_bytes: int, device: str = "RAM") -> FitPlan:
    """The model-file budget for a machine with free_bytes on the device that will hold it."""
    reader = open_gguf(model_path)
    kv = kv_cache_bytes(reader, n_ctx)
    buffers = logits_bytes(reader, n_ctx) + COMPUTE_MARGIN
    headroom = int(free_bytes * HEADROOM)
    budget = free_bytes - kv - buffers - headroom
    if budget <= 0:
        raise UserError(f"no room for a model: {free_bytes / MiB:,.0f} MiB free {device} holds only the KV cache "
                        f"({kv / MiB:,.0f} MiB at ctx {n_ctx}) and buffers; lower --context-size")
    return FitPlan(device, free_bytes, kv, buffers, headroom, budget)
