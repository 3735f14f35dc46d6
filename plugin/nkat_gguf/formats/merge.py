"""A model file with theta folded into its weights: W' = dequant(W) + applied_scale(gamma) * B @ A.

The reference that both run-time backends (llama.cpp's adapter path and the native shim) are
checked against: it needs no run-time correction at all, so it shares no code with either.
Only the weights that theta targets change (stored F32 or F16); every other tensor and every
metadata key is copied byte for byte. With no theta (or gamma 0) it is the dequantized base
alone, which measures what the base type's own matmul path (activations quantized to Q8 for
Q4_0 weights) costs against exact weights: the noise floor of any comparison with the merge.

Tensor by tensor: one weight matrix is float32 in memory at a time.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from .gguf_io import ModelFile, copy_metadata, copy_tensor_info, start_data, write_gguf
from .nkat_format import applied_scale, read_nkat

MERGE_TYPES = {"f32": np.float32, "f16": np.float16}


def write_merged(model_path: str | os.PathLike, out_path: str | os.PathLike, theta_path=None,
                 gamma: float | None = None, dtype: str = "f32", names: list[str] | None = None) -> dict:
    """Write model_path with theta (gamma: the file's when None) merged into its weights.

    Without theta_path, `names` (default: every block weight matrix) are only dequantized.
    Returns {"output", "bytes", "merged": count, "dequantized": count, "gamma", "dtype"}."""
    if dtype not in MERGE_TYPES:
        raise UserError(f"merge type must be one of {', '.join(MERGE_TYPES)}, not {dtype!r}")
    model = ModelFile(model_path)
    factors, scale = {}, 0.0
    if theta_path is not None:
        nkat = read_nkat(theta_path)
        gamma = nkat.gamma if gamma is None else float(gamma)
        factors, scale = nkat.factors, applied_scale(gamma)
        missing = [n for n in factors if n not in model.tensors]
        if missing:
            raise UserError(f"{theta_path}: theta for {missing[0]}, which {model.path.name} lacks")
    changed = names if names is not None else (list(factors) if factors else model.target_names())
    for name in changed:
        if name not in model.tensors or len(model.tensors[name].shape) != 2:
            raise UserError(f"{model.path.name}: no weight matrix {name}")
    changed_set, np_type = set(changed), MERGE_TYPES[dtype]

    def merged(name: str) -> np.ndarray:
        w = model.dequantize(name)
        f = factors.get(name)
        if f is not None and scale:
            if f.B.shape[0] != w.shape[0] or f.A.shape[1] != w.shape[1]:
                raise UserError(f"{theta_path}: {name} theta is {f.B.shape[0]}x{f.A.shape[1]}, the weight {w.shape}")
            w += np.float32(scale) * (f.B @ f.A)
        return w.astype(np_type, copy=False)

    with write_gguf(out_path, model.architecture) as writer:
        copy_metadata(writer, model.reader)
        for t in model.reader.tensors:
            if t.name in changed_set:
                n_out, n_in = model.shape(t.name)
                writer.add_tensor_info(t.name, (n_out, n_in), np.dtype(np_type), n_out * n_in * np.dtype(np_type).itemsize)
            else:
                copy_tensor_info(writer, t)
        start_data(writer)
        for t in model.reader.tensors:
            writer.write_tensor_data(merged(t.name) if t.name in changed_set else t.data)
    return {"output": str(out_path), "bytes": os.path.getsize(out_path), "merged": len(factors) if scale else 0,
            "dequantized": len(changed), "gamma": gamma, "dtype": dtype}
