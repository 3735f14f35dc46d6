"""Activation statistics as llama.cpp's imatrix files: read both formats, write the GGUF one.

Per weight matrix: sum over input columns (tokens) of x_i^2 for each input dimension i, and the
number of columns. E[x_i^2] = sum / count, and the column scales for activation-scaled theta are
s_i = sqrt(E[x_i^2]).

Formats (as llama.cpp's tools/imatrix writes them):
- GGUF: general.type = "imatrix", imatrix.datasets (string array), imatrix.chunk_count and
  imatrix.chunk_size (u32); per weight `<name>.in_sum2` (F32, ggml [n_in, n_mat]) and
  `<name>.counts` (F32, [1, n_mat]); `<name>.in_sum` (sum of x) may be present and is ignored.
- legacy .dat: int32 n_entries, then per entry int32 name length, the name, int32 ncall,
  int32 nval, float32[nval] holding E[x^2] * ncall; then int32 chunk count and the dataset
  name. The per-chunk token count is not stored: like llama.cpp we assume 512.
Weights with several matrices (MoE experts, n_mat > 1) are pooled over their experts.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from gguf import GGUFType, Keys

from ..util.atomic import atomic_path
from ..errors import UserError
from .gguf_io import GGUF_MAGIC, open_gguf, read_magic, write_gguf

SUFFIX_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"
LEGACY_CHUNK_SIZE = 512
# Columns that (almost) never fired get at least this fraction of the median RMS, so that
# 1/s in A = V^T diag(1/s) stays bounded (and INT8 storage of A keeps its precision).
SCALE_FLOOR = 1e-2

Stats = dict[str, tuple[np.ndarray, int]]


def mean_squares(sum_sq: np.ndarray, count: int) -> np.ndarray:
    """E[x^2] per input column (sum / count), float32: what llama.cpp's quantizer takes as importance."""
    return np.ascontiguousarray(np.asarray(sum_sq, dtype=np.float64) / max(count, 1), dtype=np.float32)


def column_scales(sum_sq: np.ndarray, count: int) -> np.ndarray:
    """s_i = sqrt(sum_sq_i / count), float32, floored at SCALE_FLOOR x the median of the positive s."""
    sum_sq = np.asarray(sum_sq, dtype=np.float64)
    if count <= 0 or sum_sq.ndim != 1 or not np.isfinite(sum_sq).all() or (sum_sq < 0).any():
        raise UserError(f"activation statistics are unusable (count {count}, {sum_sq.size} values)")
    s = np.sqrt(sum_sq / count)
    positive = s[s > 0]
    if positive.size == 0:
        return np.ones_like(s, dtype=np.float32)
    floor = SCALE_FLOOR * float(np.median(positive))
    return np.maximum(s, floor).astype(np.float32)


# ------------------------------------------------------------------ reading ------------

def read_imatrix(path: str | os.PathLike) -> Stats:
    """name -> (sum of x^2 per input column, float32 (n_in,), column count), either format."""
    path = Path(path)
    is_gguf = read_magic(path, missing="imatrix file not found") == GGUF_MAGIC
    stats = _read_gguf(path) if is_gguf else _read_legacy(path)
    if not stats:
        raise UserError(f"{path}: the imatrix holds no statistics")
    return stats


def _read_gguf(path: Path) -> Stats:
    reader = open_gguf(path, GGUFType.IMATRIX, untyped_ok=True)
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(SUFFIX_SUM2):
            sums[t.name[: -len(SUFFIX_SUM2)]] = t
        elif t.name.endswith(SUFFIX_COUNTS):
            counts[t.name[: -len(SUFFIX_COUNTS)]] = t
    stats = {}
    for name, t_sum in sums.items():
        if name not in counts:
            raise UserError(f"{path}: {name} has {SUFFIX_SUM2} but no {SUFFIX_COUNTS}")
        n_in, n_mat = int(t_sum.shape[0]), int(np.prod(t_sum.shape[1:]))
        sum2 = np.asarray(t_sum.data, dtype=np.float32).reshape(n_mat, n_in)
        cnt = np.asarray(counts[name].data, dtype=np.float64).reshape(-1)
        if cnt.size != n_mat:
            raise UserError(f"{path}: {name} has {n_mat} matrices but {cnt.size} counts")
        stats[name] = (sum2.sum(axis=0, dtype=np.float64).astype(np.float32), int(round(cnt.sum())))
    return stats


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise UserError(f"{self.path}: truncated or not an imatrix file (legacy .dat format)")
        chunk = self.data[self.pos: self.pos + n]
        self.pos += n
        return chunk

    def i32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]


def _read_legacy(path: Path) -> Stats:
    cur = _Cursor(path.read_bytes(), path)
    n_entries = cur.i32()
    if not 0 < n_entries < 1_000_000:
        raise UserError(f"{path}: not an imatrix file (neither GGUF nor legacy .dat)")
    stats = {}
    for _ in range(n_entries):
        length = cur.i32()
        if not 0 < length < 4096:
            raise UserError(f"{path}: corrupt legacy imatrix (name length {length})")
        name = cur.take(length).decode("utf-8", errors="replace")
        ncall, nval = cur.i32(), cur.i32()
        if nval < 1:
            raise UserError(f"{path}: corrupt legacy imatrix ({name}: {nval} values)")
        values = np.frombuffer(cur.take(4 * nval), dtype="<f4").astype(np.float64)
        ncall = max(ncall, 1)
        # stored: E[x^2] * ncall, with ncall chunks of LEGACY_CHUNK_SIZE tokens
        stats[name] = ((values * LEGACY_CHUNK_SIZE).astype(np.float32), ncall * LEGACY_CHUNK_SIZE)
    return stats


# ------------------------------------------------------------------ writing ------------

def write_imatrix(path: str | os.PathLike, stats: Stats, dataset: str | list[str] = "", chunks: int = 0,
                  chunk_size: int = 512, architecture: str = "") -> Path:
    """The GGUF imatrix format llama.cpp reads (llama-quantize --imatrix, llama-imatrix --in-file)."""
    if not stats:
        raise UserError("no activation statistics to write (did any weight see input?)")
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)
    path = Path(path)
    with write_gguf(path, architecture or "", GGUFType.IMATRIX) as writer:
        writer.add_array(Keys.IMatrix.DATASETS, [d for d in datasets if d] or [""])  # an empty array is dropped
        writer.add_uint32(Keys.IMatrix.CHUNK_COUNT, int(chunks))
        writer.add_uint32(Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
        for name in sorted(stats):
            sum_sq, count = stats[name]
            sum_sq = np.ascontiguousarray(sum_sq, dtype=np.float32).reshape(1, -1)
            writer.add_tensor(name + SUFFIX_SUM2, sum_sq)
            writer.add_tensor(name + SUFFIX_COUNTS, np.array([[float(count)]], dtype=np.float32))
    return path


def write_imatrix_legacy(path: str | os.PathLike, stats: Stats, dataset: str = "", chunks: int = 0,
                         chunk_size: int = LEGACY_CHUNK_SIZE) -> Path:
    """The older binary .dat format (for tools that predate the GGUF imatrix)."""
    if not stats:
        raise UserError("no activation statistics to write (did any weight see input?)")
    out = bytearray(struct.pack("<i", len(stats)))
    for name in sorted(stats):
        sum_sq, count = stats[name]
        ncall = max(1, -(-int(count) // chunk_size))  # ceiling, as llama.cpp
        values = (np.asarray(sum_sq, np.float64) / max(int(count), 1) * ncall).astype("<f4")
        encoded = name.encode()
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size) + values.tobytes()
    encoded = dataset.encode()
    out += struct.pack("<i", int(chunks)) + struct.pack("<i", len(encoded)) + encoded
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(bytes(out))
    return path
