"""ggml's own quantizers, called on any rows: the exact bytes llama.cpp's quantizer writes for a
type (``ggml_quantize_chunk``, the routine llama-quant.cpp calls per tensor), and ggml's own
dequantization of them (the type's ``to_float``).

Reached with cffi in ABI mode over the libggml-base that llama-cpp-python ships (llama_cpp/lib),
so nothing is compiled and the routines are those of the llama.cpp the models run on. cffi
releases the GIL during each call, so rows are split over threads.

Rows are independent in every type, so a sample of rows quantizes to the same bytes as those rows
of the whole tensor. Along a row, k- and i-quant blocks are independent too; Q4_0/Q4_1/Q5_x with
importance weights are not (their weighted path uses a statistic of the whole row).
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import UserError

_CDEF = """
typedef void (*ggml_to_float_t)(const void * x, float * y, int64_t k);
typedef void (*ggml_from_float_t)(const float * x, void * y, int64_t k);
struct ggml_type_traits {
    const char * type_name;
    int64_t blck_size;
    int64_t blck_size_interleave;
    size_t type_size;
    bool is_quantized;
    ggml_to_float_t to_float;
    ggml_from_float_t from_float_ref;
};
const struct ggml_type_traits * ggml_get_type_traits(int type);
void ggml_quantize_init(int type);
bool ggml_quantize_requires_imatrix(int type);
size_t ggml_quantize_chunk(int type, const float * src, void * dst, int64_t start, int64_t nrows,
                           int64_t n_per_row, const float * imatrix);
size_t ggml_row_size(int type, int64_t ne);
"""
# Rows per call when a quantization is split over threads.
_ROWS_PER_TASK = 64


@lru_cache(maxsize=1)
def _ggml():
    from cffi import FFI

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    found = sorted(lib_dir.glob("libggml-base.*"))
    if not found:
        raise UserError(f"libggml-base not found in {lib_dir}; reinstall llama-cpp-python")
    ffi = FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(str(found[0]))


def ggml_type(qtype) -> GGMLQuantizationType:
    """A GGMLQuantizationType from itself, its value or its name ('q4_k', 'IQ3_S')."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, (int, np.integer)):
        return GGMLQuantizationType(int(qtype))
    try:
        return GGMLQuantizationType[str(qtype).upper()]
    except KeyError:
        raise UserError(f"unknown GGML type {qtype!r}") from None


def block_size(qtype) -> int:
    """Elements per block: 32 for Q4_0/Q5_0/Q8_0, 256 for k- and i-quants, 1 for F16/F32."""
    _, lib = _ggml()
    return int(lib.ggml_get_type_traits(int(ggml_type(qtype))).blck_size)


def row_bytes(qtype, n_per_row: int) -> int:
    """Bytes of one row of n_per_row elements in this type."""
    _, lib = _ggml()
    return int(lib.ggml_row_size(int(ggml_type(qtype)), int(n_per_row)))


def requires_importance(qtype) -> bool:
    """True for the types ggml refuses to quantize without importance weights (IQ1/IQ2 family)."""
    _, lib = _ggml()
    return bool(lib.ggml_quantize_requires_imatrix(int(ggml_type(qtype))))


def fits_rows(qtype, n_per_row: int) -> bool:
    """Whether rows of this length are whole blocks of the type (else llama.cpp falls back)."""
    return n_per_row % block_size(qtype) == 0


def _check_rows(qtype, n_per_row: int) -> GGMLQuantizationType:
    t = ggml_type(qtype)
    if not fits_rows(t, n_per_row):
        raise UserError(f"{t.name} needs rows that are a multiple of {block_size(t)} elements, not {n_per_row}")
    return t


def _threads(n_rows: int, threads: int | None) -> int:
    import os

    return max(1, min(threads or os.cpu_count() or 1, -(-n_rows // _ROWS_PER_TASK)))


def quantize_rows(qtype, rows: np.ndarray, importance: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """rows (n, k) float32 -> (n, row_bytes) uint8, exactly as ggml_quantize_chunk writes them.

    importance: k non-negative weights (llama.cpp passes the imatrix's mean of x^2 per column)."""
    ffi, lib = _ggml()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D, not {rows.shape}")
    n, k = rows.shape
    t = _check_rows(qtype, k)
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (k,):
            raise ValueError(f"importance must have {k} values, not {importance.shape}")
    elif requires_importance(t):
        raise UserError(f"{t.name} cannot be quantized without importance weights (an imatrix)")
    stride = row_bytes(t, k)
    out = np.empty((n, stride), dtype=np.uint8)
    if n == 0:
        return out
    lib.ggml_quantize_init(int(t))  # i-quants build their grids once, before the threads start
    imat = ffi.NULL if importance is None else ffi.cast("const float *", importance.ctypes.data)

    def run(start: int) -> None:
        count = min(_ROWS_PER_TASK, n - start)
        src = ffi.cast("const float *", rows[start:].ctypes.data)
        dst = ffi.cast("void *", out[start:].ctypes.data)
        written = lib.ggml_quantize_chunk(int(t), src, dst, 0, count, k, imat)
        if written != count * stride:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {count} rows of {t.name}, not {count * stride}")

    starts = range(0, n, _ROWS_PER_TASK)
    workers = _threads(n, threads)
    if workers == 1:
        for s in starts:
            run(s)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))
    return out


def dequantize_rows(qtype, data: np.ndarray, n_per_row: int) -> np.ndarray:
    """(n, row_bytes) uint8 in this type -> (n, n_per_row) float32, by ggml's own to_float."""
    ffi, lib = _ggml()
    t = _check_rows(qtype, n_per_row)
    stride = row_bytes(t, n_per_row)
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, stride) if np.asarray(data).size else \
        np.zeros((0, stride), dtype=np.uint8)
    out = np.empty((data.shape[0], n_per_row), dtype=np.float32)
    if t == GGMLQuantizationType.F32:
        return data.view(np.float32).reshape(out.shape).copy()
    traits = lib.ggml_get_type_traits(int(t))
    if traits.to_float == ffi.NULL:
        raise UserError(f"ggml has no dequantization for {t.name}")
    traits.to_float(ffi.cast("const void *", data.ctypes.data), ffi.cast("float *", out.ctypes.data), out.size)
    return out


def roundtrip(qtype, rows: np.ndarray, importance: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """What the model computes with after quantizing rows to this type: dequantize(quantize(rows))."""
    rows = np.asarray(rows, dtype=np.float32)
    return dequantize_rows(qtype, quantize_rows(qtype, rows, importance, threads), rows.shape[1])
