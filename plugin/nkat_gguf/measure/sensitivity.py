"""Where quantization hurt: per-tensor error energy, weighted by activations as theta's source is.

For a weight W_q quantized from W_ref with input-column RMS s (from an imatrix), the energy
||(W_ref - W_q) diag(s)||_F^2 is the expected squared output error the quantization adds: the very
quantity activation-scaled theta (source residual-act) removes by its SVD. The mixed-precision
controls upgrade tensors in order of this energy per extra byte.
Tensors are read in row blocks, so a 151,936-row embedding never sits whole in float32.
"""

from __future__ import annotations

import numpy as np
from gguf.quants import dequantize

from ..errors import UserError
from ..formats.gguf_io import open_gguf

_ROWS_PER_BLOCK = 8192


def _rows(tensor, start: int, stop: int) -> np.ndarray:
    data = tensor.data[start:stop]
    rows = dequantize(data, tensor.tensor_type) if tensor.tensor_type.name not in ("F32",) else data
    return np.asarray(rows, dtype=np.float32).reshape(stop - start, -1)


def residual_energy(base_path, reference_path, names: list[str], scales: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """name -> sum of ((W_ref - W_base) * s)^2 (s = 1 where no scales are given)."""
    base = {t.name: t for t in open_gguf(base_path).tensors}
    ref = {t.name: t for t in open_gguf(reference_path).tensors}
    out = {}
    for name in names:
        if name not in base or name not in ref:
            raise UserError(f"tensor {name} is missing from {base_path if name not in base else reference_path}")
        tb, tr = base[name], ref[name]
        if tuple(tb.shape) != tuple(tr.shape):
            raise UserError(f"{name}: shapes differ between {base_path} and {reference_path}")
        n_rows = int(np.prod(tb.shape[1:])) if len(tb.shape) > 1 else 1
        s = None if scales is None else scales.get(name)
        total = 0.0
        for start in range(0, n_rows, _ROWS_PER_BLOCK):
            stop = min(n_rows, start + _ROWS_PER_BLOCK)
            diff = _rows(tr, start, stop) - _rows(tb, start, stop)
            if s is not None:
                diff *= s[None, :]
            total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        out[name] = total
    return out
