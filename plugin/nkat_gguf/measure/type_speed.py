"""How fast each llama.cpp type generates on this machine, measured in llama.cpp itself.

A mix's generation speed differs from a stock file's only in its matrices' types: the rest of the
graph is the same. And on a CPU the types differ more than their bytes say (a mix of mostly IQ3_S
generated at 0.61x the tokens/s of Q3_K_S, docs/RESULTS.md). So each type gets a cost in seconds
per weight per generated token, measured as llama.cpp runs it (its kernels, its CPU repacking,
these threads, this CPU):

- a *timing model* per type: the reference's first few blocks (metadata cut to them), every block
  matrix in that type where its rows are whole blocks of it, else in Q8_0; token_embd and output in
  one small type in every timing model, so their cost is the same everywhere. The tensor data is a
  few rows quantized by ggml, tiled: a timing model is written in seconds, and only its speed
  means anything;
- every timing model and the reference itself timed in turns, one generated token at a time; the
  median per-token time of each;
- a type's cost per weight is its timing model's time minus the Q8_0 timing model's, over the
  weights it holds in that type. A file's time per token is then the reference's, plus the sum over
  its matrices of weights x (cost of its type - cost of the reference's type) (predicted_seconds).

token_embd is a row lookup, not a matmul: its type costs nothing here. Cached in the work
directory by reference, types, CPU, llama.cpp build and threads.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, Keys

from ..errors import UserError
from ..formats.gguf_io import (copy_metadata, copy_tensor_info, field_value, fingerprint_file, open_gguf,
                               start_data, write_gguf)
from ..recipe.candidates import NEEDS_IMATRIX, is_allocated
from ..runtime.ggml_quants import fits_rows, quantize_rows
from ..runtime.settings import RuntimeSettings
from ..util.atomic import write_text_atomic
from ..util.report import cpu_name, progress, say

REVISION = 1  # bump when the measurement changes: cached costs are then measured again
BASE_TYPE = "Q8_0"  # every cost is relative to it (rows of 32: fits almost every matrix)
# Block-matrix weights a timing model aims at: enough that a type's difference is several times
# the noise of a median per-token time, few enough that ~20 of them are written in seconds.
TARGET_WEIGHTS = 150_000_000
TILE_ROWS = 32  # rows quantized per tensor shape; the rest of the tensor repeats them
TOKENS = 16  # generated tokens timed per model per turn
WARM_UP = 4
TURNS = 5


@dataclass
class TypeSpeed:
    """Seconds per weight per generated token of each type, relative to Q8_0, and the reference's
    own seconds per token: a file's predicted time per token follows (predicted_seconds)."""

    cost: dict[str, float]  # type -> seconds per weight per token, minus Q8_0's
    reference_seconds: float  # the reference's median time per generated token
    reference_types: dict[str, str]  # allocated tensor -> its type in the reference
    weights: dict[str, int]  # allocated tensor -> its weights
    facts: dict

    def tensor_seconds(self, name: str, qtype: str) -> float:
        """One tensor's share of the time per token at a type, relative to Q8_0 (0 for token_embd)."""
        if name == "token_embd.weight":
            return 0.0
        return self.weights[name] * self.cost[qtype]

    def relative_seconds(self, types: dict[str, str]) -> float | None:
        """The matrices' summed time per token at these types, relative to Q8_0 (only differences
        mean anything); None for a type not measured (no block matrix of the reference takes it)."""
        if any(types.get(n, t) not in self.cost for n, t in self.reference_types.items() if n != "token_embd.weight"):
            return None
        return sum(self.tensor_seconds(n, types.get(n, t)) for n, t in self.reference_types.items())

    def predicted_seconds(self, types: dict[str, str]) -> float | None:
        """Time per generated token of a file with these tensor types: the reference's, plus the
        difference of their summed times (None: a type not measured)."""
        mine, ref = self.relative_seconds(types), self.relative_seconds(self.reference_types)
        return None if mine is None or ref is None else self.reference_seconds + mine - ref

    def to_dict(self) -> dict:
        return {"cost_per_weight_vs_q8_0": self.cost, "reference_seconds_per_token": self.reference_seconds,
                **self.facts}


def llama_build() -> str:
    """The llama.cpp build the speeds belong to: llama-cpp-python's version and ggml's CPU features."""
    import llama_cpp

    return f"{llama_cpp.__version__} {llama_cpp.llama_print_system_info().decode().strip()}"


def block_count(reader) -> int:
    """The reference's number of blocks (its {arch}.block_count); a one-line error without one."""
    arch = str(field_value(reader, Keys.General.ARCHITECTURE, "unknown"))
    n = field_value(reader, Keys.LLM.BLOCK_COUNT.format(arch=arch))
    if n is None:
        raise UserError(f"{reader.nkat_path}: no {Keys.LLM.BLOCK_COUNT.format(arch=arch)}: its types' speeds cannot "
                        "be timed")
    return int(n)


def timing_blocks(reader, n_blocks: int) -> int:
    """How many of the reference's blocks a timing model keeps (TARGET_WEIGHTS of block matrices)."""
    per_block = sum(int(t.n_elements) for t in reader.tensors
                    if t.name.startswith("blk.0.") and is_allocated(t.name, len(t.shape)))
    return max(1, min(n_blocks, -(-TARGET_WEIGHTS // max(per_block, 1))))


def _small_type(n_in: int) -> str:
    """The vocabulary-sized tensors' type in every timing model: small, no imatrix needed."""
    return next(t for t in ("Q2_K", "Q4_0", "Q8_0", "F16") if fits_rows(t, n_in))


def _tiled(qtype: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """(n_out, row bytes) of qtype: TILE_ROWS rows quantized by ggml, repeated."""
    rows = rng.standard_normal((min(TILE_ROWS, n_out), n_in), dtype=np.float32) * 0.02
    importance = np.ones(n_in, dtype=np.float32) if qtype in NEEDS_IMATRIX else None
    if qtype == "F16":
        block = rows.astype(np.float16).view(np.uint8)
    else:
        block = quantize_rows(qtype, rows, importance)
    return np.resize(block, (n_out, block.shape[1]))


def write_timing_model(reader, qtype: str, blocks: int, path: Path) -> int:
    """The first `blocks` blocks of the reference (reader: open_gguf's) with every block matrix in
    qtype (Q8_0 where its rows do not fit qtype), as described above; returns the weights written
    in qtype."""
    arch = str(field_value(reader, Keys.General.ARCHITECTURE, "unknown"))
    n_blocks = block_count(reader)
    count_key = Keys.LLM.BLOCK_COUNT.format(arch=arch)
    rng = np.random.default_rng(0)
    in_type = 0
    keep = [t for t in reader.tensors
            if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < blocks]

    def cut(name, value):  # the block count, and per-block arrays (heads per block, ...), cut to `blocks`
        if name == count_key:
            return blocks
        if isinstance(value, list) and name.startswith(arch + ".") and len(value) == n_blocks:
            return value[:blocks]
        return value

    with write_gguf(path, arch, alignment=int(field_value(reader, Keys.General.ALIGNMENT, 32))) as writer:
        copy_metadata(writer, reader, cut)
        data = []
        for t in keep:
            if not is_allocated(t.name, len(t.shape)):
                copy_tensor_info(writer, t)
                data.append(t.data)
                continue
            n_in, n_out = int(t.shape[0]), int(t.shape[1])
            if t.name in ("token_embd.weight", "output.weight"):
                want = _small_type(n_in)
            elif fits_rows(qtype, n_in):
                want = qtype
                in_type += n_in * n_out
            else:
                want = BASE_TYPE if fits_rows(BASE_TYPE, n_in) else "F16"
            raw = _tiled(want, n_out, n_in, rng)
            writer.add_tensor_info(t.name, raw.shape, raw.dtype, raw.nbytes, GGMLQuantizationType[want])
            data.append(raw)
        start_data(writer)
        for d in data:
            writer.write_tensor_data(d)
    return in_type


def cache_key(reference: str, types: list[str], threads: int) -> str:
    parts = [REVISION, fingerprint_file(reference), sorted(types), cpu_name(), llama_build(), threads]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def time_models(paths: dict[str, str], runtime: RuntimeSettings, quiet: bool) -> dict[str, float]:
    """Median seconds per generated token of each model, timed in turns (every model once per
    turn, so a change of machine load reaches all of them alike). One model is loaded at a time:
    memory stays at the largest one's."""
    from ..runtime.engine import Runtime

    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in progress(range(TURNS), desc="time", quiet=quiet, unit="turn"):
        for name, path in paths.items():
            try:
                rt = Runtime.from_settings(path, None, runtime, n_ctx=WARM_UP + TOKENS + 8, n_batch=8)
            except UserError as exc:
                raise UserError(f"timing the types' speeds ({name}): {exc}") from None
            with rt:
                for pos in range(WARM_UP):  # pages the weights in, builds the graph
                    rt.decode([1], pos, logits_from=0)
                for pos in range(WARM_UP, WARM_UP + TOKENS):
                    t0 = time.perf_counter()
                    rt.decode([1], pos, logits_from=0)
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def measure_type_speed(reference: str, types: list[str], work: Path, runtime: RuntimeSettings,
                       quiet: bool = False) -> TypeSpeed:
    """Each type's cost per weight (above), cached in the work directory."""
    reader = open_gguf(reference)
    allocated = [t for t in reader.tensors if is_allocated(t.name, len(t.shape))]
    weights = {t.name: int(t.n_elements) for t in allocated}
    ref_types = {t.name: t.tensor_type.name for t in allocated}
    wanted = sorted(set(types) | set(ref_types.values()) | {BASE_TYPE})
    threads = runtime.threads or 0
    store = work / f"type-speed-{cache_key(reference, wanted, threads)}.json"
    if store.is_file():
        known = json.loads(store.read_text())
        return TypeSpeed(known["cost"], known["reference_seconds"], ref_types, weights, known["facts"])

    blocks = timing_blocks(reader, block_count(reader))
    widths = {int(t.shape[0]) for t in allocated if t.name.startswith("blk.")}
    wanted = [t for t in wanted if t == BASE_TYPE or any(fits_rows(t, w) for w in widths)]  # else nothing to time
    say(f"[speed] timing models of {blocks} block(s) in {len(wanted)} types, then timed in llama.cpp", quiet)
    t0 = time.perf_counter()
    paths, in_type = {}, {}
    tmp = work / "timing-models"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        for t in progress(wanted, desc="write", quiet=quiet, unit="type"):
            p = tmp / f"timing-{t}.gguf"
            in_type[t] = write_timing_model(reader, t, blocks, p)  # one open of the reference serves all
            paths[t] = str(p)
        seconds = time_models({**paths, "reference": reference}, runtime, quiet)
    finally:
        for p in paths.values():
            Path(p).unlink(missing_ok=True)
        if tmp.is_dir() and not any(tmp.iterdir()):
            tmp.rmdir()
    base = seconds[BASE_TYPE]
    cost = {t: (seconds[t] - base) / in_type[t] for t in wanted if in_type[t] and t != BASE_TYPE}
    cost[BASE_TYPE] = 0.0
    facts = {"cpu": cpu_name(), "llama_build": llama_build(), "threads": threads, "blocks": blocks,
             "timing_model_seconds_per_token": {t: seconds[t] for t in wanted},
             "weights_in_type": in_type, "measure_seconds": time.perf_counter() - t0}
    write_text_atomic(store, json.dumps({"cost": cost, "reference_seconds": seconds["reference"], "facts": facts},
                                        indent=1))
    return TypeSpeed(cost, seconds["reference"], ref_types, weights, facts)
