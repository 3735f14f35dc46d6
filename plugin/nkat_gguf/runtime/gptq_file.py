"""A standard GGUF quantized by GPTQ block propagation (runtime/gptq.py), laid out as llama.cpp's.

llama.cpp quantizes the model first (same type, the imatrix when given) into the temporary output:
that fixes every tensor's type, the metadata and the layout. Then the data of each weight matrix
that has an input covariance is overwritten in place with the GPTQ bytes of the same type, after
checking that type and byte count match. token_embd, output and tensors without a covariance stay
as llama.cpp wrote them. The output is renamed into place only when complete (util/atomic).
One matrix at a time; the covariance is memory-mapped.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGUFReader

from ..errors import BadSetting, Setting, UserError
from ..formats.covariance import CovarianceFile
from ..formats.gguf_io import ModelFile
from ..util.atomic import atomic_path
from ..util.report import progress
from ..util.signals import raise_if_terminated
from .ggml_quants import block_size, fits_rows
from .gptq import DEFAULT_DAMP, gptq_quantize_matrix
from .quantize import quantize_model

# Never rewritten: llama.cpp's choice stands for the embedding and the output head (no covariance
# describes their inputs in the layout we need: token_embd is a row lookup).
KEEP = ("token_embd.weight", "output.weight")


def gptq_targets(reader: GGUFReader, covariance: CovarianceFile) -> list:
    """The tensors of a llama.cpp-quantized file that GPTQ rewrites: 2-D, with a covariance,
    in a block type whose rows are whole blocks."""
    out = []
    for t in reader.tensors:
        if t.name in KEEP or t.name not in covariance or len(t.shape) != 2:
            continue
        if block_size(t.tensor_type) > 1 and fits_rows(t.tensor_type, int(t.shape[0])):
            out.append(t)
    return out


def gptq_quantize_model(input_path: str, output_path: str, qtype: str, covariance: str,
                        imatrix: str | None = None, damp: float = DEFAULT_DAMP, by_importance: bool = True,
                        threads: int | None = None, quiet: bool = False) -> dict:
    """Quantize input_path to qtype as llama.cpp does, then replace every covariance-covered
    matrix by its GPTQ quantization in the same type. Returns quantize_model's report plus
    'method', 'damp', 'gptq_tensors' (name -> type) and 'kept_tensors' (names llama.cpp's bytes stand for)."""
    if not damp >= 0 or not np.isfinite(damp):
        raise BadSetting(Setting.GPTQ_DAMP, f"must be a non-negative number, not {damp}")
    cov = CovarianceFile(covariance)
    source = ModelFile(input_path)
    missing = [n for n in cov.users if n not in source.tensors]
    if missing:
        raise BadSetting(Setting.COVARIANCE, f"{covariance} describes {missing[0]}, which {input_path} does not "
                         "have (calibrate on the model being quantized)")
    rewritten, kept = {}, []
    with atomic_path(output_path, [input_path, covariance]) as tmp:
        result = quantize_model(input_path, str(tmp), qtype, threads, imatrix=imatrix)
        reader = GGUFReader(tmp)
        targets = gptq_targets(reader, cov)
        target_names = {t.name for t in targets}
        kept = [t.name for t in reader.tensors if len(t.shape) == 2 and t.name not in target_names]
        for t in progress(targets, desc="gptq", quiet=quiet, unit="matrix"):
            raise_if_terminated()
            rewritten[t.name] = _rewrite(tmp, t, source, cov, damp, by_importance, threads)
        del reader, targets
    result.update({"output": str(output_path), "bytes": os.path.getsize(output_path), "method": "gptq",
                   "covariance": str(covariance), "damp": damp, "gptq_tensors": rewritten, "kept_tensors": kept})
    return result


def _rewrite(path, tensor, source: ModelFile, cov: CovarianceFile, damp: float, by_importance: bool,
             threads: int | None) -> str:
    """Overwrite one tensor's data in the file at path with its GPTQ bytes; returns its type name."""
    n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])
    if source.shape(tensor.name) != (n_out, n_in):
        raise UserError(f"{tensor.name}: the input model has shape {source.shape(tensor.name)}, "
                        f"llama.cpp wrote {(n_out, n_in)}")
    data = gptq_quantize_matrix(source.dequantize(tensor.name), cov.autocorrelation(tensor.name),
                                tensor.tensor_type, damp=damp, by_importance=by_importance, threads=threads)
    if data.nbytes != tensor.n_bytes:
        raise RuntimeError(f"{tensor.name}: GPTQ made {data.nbytes} bytes of {tensor.tensor_type.name}, "
                           f"llama.cpp wrote {tensor.n_bytes}")
    target = np.memmap(path, dtype=np.uint8, mode="r+", offset=tensor.data_offset, shape=(tensor.n_bytes,))
    target[:] = data.reshape(-1)
    target.flush()
    del target
    return tensor.tensor_type.name
