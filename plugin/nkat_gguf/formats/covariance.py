"""Input covariance files: per distinct matmul input, the sum of x x^T and the column count.

The one definition of the format (GGUF, our own keys: NkatKeys.Covariance):
  general.type                 "nkat.covariance"
  nkat.covariance.version      u32, COV_VERSION
  nkat.covariance.datasets     [str], the calibration text(s)
  nkat.covariance.chunk_count  u32, chunks decoded
  nkat.covariance.chunk_size   u32, tokens per chunk
  nkat.covariance.weights      [str], "WEIGHT=INPUT" for every weight: the entry holding the
                               statistics of WEIGHT's input
  per INPUT (named after the first weight that reads it, e.g. blk.3.attn_q.weight for q/k/v):
    INPUT.xxt    F32 (n_in, n_in)  sum over input columns of x x^T (summed in float64)
    INPUT.count  F64 (1,)          the number of columns
The diagonal of INPUT.xxt is what an imatrix stores as in_sum2 for each of its weights.
The file is written as a stream (one group of blocks at a time), under a temporary name that is
renamed only when every tensor is in.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import UserError
from .gguf_io import field_value, open_gguf, start_data, write_gguf
from .keys import NkatKeys

COV_TYPE = NkatKeys.Covariance.TYPE
COV_VERSION = 1
SUFFIX_XXT = ".xxt"
SUFFIX_COUNT = ".count"

# Weights that read the same input as another weight of their block (llama-family graphs:
# q/k/v all read the attention norm's output, gate/up the FFN norm's output).
SHARED_INPUT = {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"}
_BLOCK_WEIGHT = re.compile(r"^blk\.(\d+)\.([A-Za-z0-9_]+)\.weight$")


def block_of(name: str) -> int:
    m = _BLOCK_WEIGHT.match(name)
    return int(m.group(1)) if m else -1


def input_of(names: list[str]) -> dict[str, str]:
    """weight -> the weight whose input entry it shares (itself when it has its own input)."""
    present = set(names)
    out = {}
    for name in names:
        m = _BLOCK_WEIGHT.match(name)
        owner = name
        if m and m.group(2) in SHARED_INPUT:
            candidate = f"blk.{m.group(1)}.{SHARED_INPUT[m.group(2)]}.weight"
            if candidate in present:
                owner = candidate
        out[name] = owner
    return out


# ------------------------------------------------------------------ writing ------------

@contextmanager
def covariance_writer(path: str | os.PathLike, inputs: dict[str, int], users: dict[str, str],
                      datasets: list[str], chunk_count: int, chunk_size: int, architecture: str):
    """Open a covariance file for streaming; yields write(input, sum_xxt, count), which must be
    called once per input in the order of `inputs` (input name -> n_in). Renamed into place only
    when the block exits normally with every input written."""
    keys = NkatKeys.Covariance
    with write_gguf(path, architecture or "", COV_TYPE) as writer:
        writer.add_uint32(keys.VERSION, COV_VERSION)
        writer.add_array(keys.DATASETS, [d for d in datasets if d] or [""])  # an empty array is dropped
        writer.add_uint32(keys.CHUNK_COUNT, int(chunk_count))
        writer.add_uint32(keys.CHUNK_SIZE, int(chunk_size))
        writer.add_array(keys.WEIGHTS, [f"{w}={i}" for w, i in users.items()])
        order = list(inputs)
        for name in order:
            n = int(inputs[name])
            writer.add_tensor_info(name + SUFFIX_XXT, (n, n), np.dtype(np.float32), 4 * n * n)
            writer.add_tensor_info(name + SUFFIX_COUNT, (1,), np.dtype(np.float64), 8)
        start_data(writer)
        written = []

        def write(name: str, sum_xxt: np.ndarray, count: int) -> None:
            expected = order[len(written)] if len(written) < len(order) else None
            if name != expected:
                raise ValueError(f"covariance entries out of order: {name}, expected {expected}")
            writer.write_tensor_data(np.ascontiguousarray(sum_xxt, dtype=np.float32))
            writer.write_tensor_data(np.array([float(count)], dtype=np.float64))
            written.append(name)

        yield write
        if len(written) != len(order):
            raise ValueError(f"covariance file incomplete: {len(written)} of {len(order)} inputs written")


# ------------------------------------------------------------------ reading ------------

class CovarianceFile:
    """A covariance file opened for reading one input at a time (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        keys = NkatKeys.Covariance
        self.path = Path(path)
        reader = open_gguf(self.path, COV_TYPE)
        version = int(field_value(reader, keys.VERSION, 0))
        if version != COV_VERSION:
            raise UserError(f"{self.path}: covariance format version {version}, this nkat reads {COV_VERSION}")
        self.chunk_count = int(field_value(reader, keys.CHUNK_COUNT, 0))
        self.chunk_size = int(field_value(reader, keys.CHUNK_SIZE, 0))
        self.users = dict(item.split("=", 1) for item in field_value(reader, keys.WEIGHTS, []))
        self._tensors = {t.name: t for t in reader.tensors}
        for owner in set(self.users.values()):
            if owner + SUFFIX_XXT not in self._tensors or owner + SUFFIX_COUNT not in self._tensors:
                raise UserError(f"{self.path}: {owner} is listed but its {SUFFIX_XXT}/{SUFFIX_COUNT} tensors are missing")

    def __contains__(self, weight: str) -> bool:
        return weight in self.users

    def _sum_tensor(self, weight: str):
        """(the x x^T tensor of weight's input, its width, the column count)."""
        owner = self.users[weight]
        t = self._tensors[owner + SUFFIX_XXT]
        count = int(round(float(np.asarray(self._tensors[owner + SUFFIX_COUNT].data).reshape(-1)[0])))
        return t, int(t.shape[0]), count

    def sum_and_count(self, weight: str) -> tuple[np.ndarray, int]:
        """(sum of x x^T, float32 (n_in, n_in), column count) of weight's input.

        Read into memory of its own rather than viewed through the file's memory map: pages read
        through a map stay in the process's resident set until it ends, and a 1.5B model's file is
        9.8 GB (nkat quantize --method gptq reads all of it once)."""
        t, n, count = self._sum_tensor(weight)
        if t.data.dtype != np.float32 or t.data.size != n * n:
            raise UserError(f"{self.path}: {t.name} is not an F32 {n} x {n} matrix")
        return np.fromfile(self.path, dtype=np.float32, count=n * n, offset=t.data_offset).reshape(n, n), count

    def autocorrelation(self, weight: str) -> np.ndarray:
        """R = E[x x^T] of weight's input, float64."""
        total, count = self.sum_and_count(weight)
        if count <= 0:
            raise UserError(f"{self.path}: the input of {weight} saw no tokens")
        return np.asarray(total, dtype=np.float64) / count

    def diagonal(self, weight: str) -> tuple[np.ndarray, int]:
        """(sum of x_i^2, count): the imatrix statistics of weight (one element per row of the map)."""
        t, n, count = self._sum_tensor(weight)
        return np.diagonal(np.asarray(t.data).reshape(n, n)).astype(np.float32), count

    def input_key(self, weight: str) -> str:
        return self.users[weight]
