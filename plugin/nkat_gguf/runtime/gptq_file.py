"""A standard GGUF quantized by GPTQ block propagation (runtime/gptq.py), laid out as llama.cpp's.

llama.cpp quantizes the model first (same type, the imatrix when given) into the temporary output:
that fixes every tensor's type, the metadata and the layout. Then the data of each weight matrix
that has an input covariance is overwritten in place with the GPTQ bytes of the same type, after
checking that type and byte count match. token_embd, output and tensors without a covariance stay
as llama.cpp wrote them. The output is renamed into place only when complete (util/atomic).
One input at a time: its covariance is read, factored once per block length, and used for every
matrix that reads it (q/k/v, gate/up), in every file rewritten together (nkat mix --gptq).
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
from .gptq import DEFAULT_DAMP, REVISION, GptqFactor, gptq_factor, gptq_quantize_matrix
from .quantize import quantize_model

# Never rewritten: llama.cpp's choice stands for the embedding and the output head (no covariance
# describes their inputs in the layout we need: token_embd is a row lookup).
KEEP = ("token_embd.weight", "output.weight")


def can_round(name: str, qtype, covariance: CovarianceFile) -> bool:
    """GPTQ can round this weight in this type: it has a covariance, is not kept as llama.cpp
    writes it (KEEP), and the type is made of blocks."""
    return name not in KEEP and name in covariance and block_size(qtype) > 1


def gptq_targets(reader: GGUFReader, covariance: CovarianceFile, skip=None) -> list:
    """The tensors of a llama.cpp-quantized file that GPTQ rewrites: 2-D, can_round, rows of whole
    blocks, and not skip(name, type name)."""
    out = []
    for t in reader.tensors:
        if len(t.shape) != 2 or not can_round(t.name, t.tensor_type, covariance):
            continue
        if skip is not None and skip(t.name, t.tensor_type.name):
            continue
        if fits_rows(t.tensor_type, int(t.shape[0])):
            out.append(t)
    return out


def gptq_quantize_model(input_path: str, output_path: str, qtype: str, covariance: str,
                        imatrix: str | None = None, damp: float = DEFAULT_DAMP, by_importance: bool = True,
                        threads: int | None = None, quiet: bool = False) -> dict:
    """Quantize input_path to qtype as llama.cpp does (token_embd weighted by its first reader's
    norm: formats.embedding_importance), then replace every covariance-covered matrix by its GPTQ
    quantization in the same type. Returns quantize_model's report plus
    'method', 'gptq_revision' (gptq.REVISION), 'damp', 'gptq_tensors' (name -> type) and 'kept_tensors'
    (names llama.cpp's bytes stand for)."""
    check_damp(damp)
    cov = CovarianceFile(covariance)
    source = ModelFile(input_path)
    check_covariance(cov, source, covariance, input_path)
    with atomic_path(output_path, [input_path, covariance]) as tmp:
        result = quantize_model(input_path, str(tmp), qtype, threads, imatrix=imatrix, weigh_embedding=True)
        rewritten, kept = rewrite_files([str(tmp)], source, cov, damp, by_importance, threads, quiet)[0]
    result.update({"output": str(output_path), "bytes": os.path.getsize(output_path), "method": "gptq",
                   "gptq_revision": REVISION, "covariance": str(covariance), "damp": damp,
                   "gptq_tensors": rewritten, "kept_tensors": kept})
    return result


def check_damp(damp: float) -> None:
    if not damp >= 0 or not np.isfinite(damp):
        raise BadSetting(Setting.GPTQ_DAMP, f"must be a non-negative number, not {damp}")


def check_covariance(cov: CovarianceFile, source: ModelFile, cov_path, model_path,
                     setting: Setting = Setting.COVARIANCE) -> None:
    """A covariance of this model: every weight it describes is one of the model's tensors."""
    missing = [n for n in cov.users if n not in source.tensors]
    if missing:
        raise BadSetting(setting, f"{cov_path} describes {missing[0]}, which {model_path} does not "
                         "have (calibrate on the model being quantized)")


def rewrite_files(paths: list[str], source: ModelFile, cov: CovarianceFile, damp: float = DEFAULT_DAMP,
                  by_importance: bool = True, threads: int | None = None, quiet: bool = False,
                  skip=None) -> list[tuple[dict, list]]:
    """Rewrite, in place, every covariance-covered matrix of each llama.cpp-written file at paths
    (all quantized from `source`) with its GPTQ bytes in the type the file has for it.

    Matrices are taken input by input, so each input's factor is computed once per block length
    for every matrix that reads it, in every file; a (matrix, type) that several files share is
    quantized once. skip(file index, name, type name) -> True leaves a tensor as llama.cpp wrote it.
    Returns, per file, (rewritten name -> type name, names of 2-D tensors left as written)."""
    readers = [GGUFReader(p) for p in paths]
    targets = [gptq_targets(r, cov, skip and (lambda name, type_name, i=i: skip(i, name, type_name)))
               for i, r in enumerate(readers)]
    done = []
    for reader, mine in zip(readers, targets):
        names = {t.name for t in mine}
        done.append(({}, [t.name for t in reader.tensors if len(t.shape) == 2 and t.name not in names]))
    jobs: dict[tuple[str, str], list] = {}  # (name, type) -> [(file index, tensor)]
    for i, mine in enumerate(targets):
        for t in mine:
            jobs.setdefault((t.name, t.tensor_type.name), []).append((i, t))
    by_input = sorted(jobs, key=lambda job: (cov.input_key(job[0]), job[0], job[1]))
    current_input, R, factors = None, None, {}  # one input at a time (the widest R and U are 640 MB each)
    current_name, W = None, None                # one tensor's reference weights, for each of its types
    for name, type_name in progress(by_input, desc="gptq", quiet=quiet, unit="matrix"):
        raise_if_terminated()
        if cov.input_key(name) != current_input:
            current_input, R, factors = cov.input_key(name), cov.autocorrelation(name), {}
        where = jobs[(name, type_name)]
        tensor = where[0][1]
        bs = block_size(tensor.tensor_type)
        if bs not in factors:
            factors[bs] = gptq_factor(R, bs, damp, by_importance)
        if name != current_name:
            current_name, W = name, _reference_weights(tensor, source)
        data = _quantize(tensor, W, factors[bs], threads)
        for i, t in where:
            _write(paths[i], t, data)
            done[i][0][name] = type_name
    return done


def _reference_weights(tensor, source: ModelFile) -> np.ndarray:
    """The source's weights of the tensor llama.cpp wrote, checked to have its shape."""
    n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])
    if source.shape(tensor.name) != (n_out, n_in):
        raise UserError(f"{tensor.name}: the input model has shape {source.shape(tensor.name)}, "
                        f"llama.cpp wrote {(n_out, n_in)}")
    return source.dequantize(tensor.name)


def _quantize(tensor, W: np.ndarray, factor: GptqFactor, threads: int | None) -> np.ndarray:
    """One tensor's GPTQ bytes in the type llama.cpp wrote it in, checked to be as many bytes."""
    data = gptq_quantize_matrix(W, None, tensor.tensor_type, threads=threads, factor=factor)
    if data.nbytes != tensor.n_bytes:
        raise RuntimeError(f"{tensor.name}: GPTQ made {data.nbytes} bytes of {tensor.tensor_type.name}, "
                           f"llama.cpp wrote {tensor.n_bytes}")
    return data


def _write(path, tensor, data: np.ndarray) -> None:
    """Overwrite one tensor's data in the file at path."""
    target = np.memmap(path, dtype=np.uint8, mode="r+", offset=tensor.data_offset, shape=(tensor.n_bytes,))
    target[:] = data.reshape(-1)
    target.flush()
    del target
