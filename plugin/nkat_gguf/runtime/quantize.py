"""A lower-bit copy of a GGUF model made by llama.cpp's own quantizer (requantizing allowed)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np

from ..util.atomic import atomic_path
from ..errors import BadSetting, Setting, UserError
from ..formats.embedding_importance import FIRST_NORM, embedding_importance
from ..formats.gguf_io import open_gguf, quant_type_by_name
from ..util.child import run_in_child
from ..util.output_paths import check_output_path


def ftype_names(lib) -> dict[str, int]:
    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {k[len(prefix):].lower(): getattr(lib, k) for k in dir(lib) if k.startswith(prefix)}


def imatrix_array(llama_cpp, path: str | None, extra: dict[str, np.ndarray] | None = None):
    """llama.cpp's importance data (E[x^2] per input column) from an imatrix file, plus `extra`
    entries for tensors the file has none for, as the C array llama_model_quantize_params.imatrix
    expects: terminated by an entry whose name is NULL (see llama-quant.cpp). Returns (array,
    buffers kept alive while llama.cpp reads them)."""
    from ..formats.imatrix import mean_squares, read_imatrix

    values = {name: mean_squares(*stat) for name, stat in (read_imatrix(path) if path else {}).items()}
    for name, v in (extra or {}).items():
        values.setdefault(name, np.ascontiguousarray(v, dtype=np.float32))
    entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep = []
    for i, (name, v) in enumerate(sorted(values.items())):
        keep.append(v)
        entries[i].name = name.encode()
        entries[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = v.size
    return entries, keep


def overrides_array(llama_cpp, overrides: dict[str, str]):
    """Per-tensor types by regex (as llama-quantize --tensor-type), NULL-pattern terminated."""
    entries = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, type_name) in enumerate(overrides.items()):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise BadSetting(Setting.TENSOR_TYPE, f"{pattern!r}: not a regular expression ({exc})") from None
        entries[i].pattern = pattern.encode()
        entries[i].type = int(quant_type_by_name(type_name))
    return entries


def quantize_model(input_path: str, output_path: str, qtype: str = "q4_0", threads: int | None = None,
                   imatrix: str | None = None, overrides: dict[str, str] | None = None,
                   weigh_embedding: bool = False) -> dict:
    """Quantize with llama_model_quantize; `imatrix` weights the rounding by activation statistics
    (importance-weighted quants, as community quants are made), `overrides` maps a tensor-name regex
    to a GGML type name. `weigh_embedding` gives token_embd an importance too (what its first
    reader weighs its columns by: formats.embedding_importance), which llama.cpp's own files lack.

    Everything is checked here; llama.cpp's call runs in a child process (util.child), so Ctrl-C or
    SIGTERM stops a quantization of minutes at once, and the partial output is removed."""
    import llama_cpp

    open_gguf(input_path)  # a clear error for missing / non-GGUF input
    check_output_path(output_path, [input_path], Setting.OUTPUT)
    names = ftype_names(llama_cpp)
    if qtype.lower() not in names:
        raise BadSetting(Setting.QUANT_TYPE, f"{qtype!r} is not a llama.cpp quant type; one of: {', '.join(sorted(names))}")
    if imatrix:
        imatrix_array(llama_cpp, imatrix)  # a bad imatrix file is a one-line error here, not in the child
    if overrides:
        overrides_array(llama_cpp, overrides)
    job = {"input": str(input_path), "ftype": names[qtype.lower()], "threads": threads or (os.cpu_count() or 1),
           "imatrix": imatrix, "overrides": dict(overrides or {}), "weigh_embedding": weigh_embedding}
    with atomic_path(output_path) as tmp:
        status = run_in_child(__name__, "quantize_job", job | {"output": str(tmp)})
        if status == QUANTIZE_FAILED:
            raise UserError(f"llama.cpp could not quantize {input_path} to {qtype}{full_disk(tmp)}")
        if status < 0:
            raise UserError(f"the quantizer process was killed by {signal.Signals(-status).name} "
                            f"while quantizing {input_path} (out of memory?)")
        if status != 0:
            raise RuntimeError(f"the quantizer process failed with status {status}")
    reader = open_gguf(output_path)
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"input": str(input_path), "output": str(output_path), "type": qtype, "imatrix": imatrix,
            "overrides": dict(overrides or {}), "embedding_importance": embedding_source(input_path, weigh_embedding),
            "bytes": os.path.getsize(output_path), "tensor_types": types}


def embedding_source(model: str, weigh_embedding: bool) -> str | None:
    """What token_embd's importance came from, for reports: the norm's name, or None (not asked
    for, or the model gives none: see formats.embedding_importance)."""
    return FIRST_NORM if weigh_embedding and embedding_importance(model) else None


# Free bytes below which a failed quantization is put down to a full disk: llama.cpp reports only
# "iostream error" when its output cannot be written.
FULL_DISK_BYTES = 16 * 2**20


def full_disk(partial) -> str:
    """': the disk holding DIR is full (N MiB free)' when the partial output's disk is full, else ''."""
    folder = Path(partial).parent
    free = shutil.disk_usage(folder).free
    return f": the disk holding {folder} is full ({free // 2**20} MiB free)" if free < FULL_DISK_BYTES else ""


QUANTIZE_FAILED = 3  # quantize_job's status when llama.cpp refused (a Python error exits with 1)


def quantize_job(job: dict) -> int:
    """In the child process: one llama_model_quantize call, inputs already checked by quantize_model."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    from .engine import LLAMA_VERBOSE

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = job["ftype"]
    params.allow_requantize = True
    params.nthread = job["threads"]
    keep = []
    extra = embedding_importance(job["input"]) if job["weigh_embedding"] else {}
    if job["imatrix"] or extra:
        entries, buffers = imatrix_array(llama_cpp, job["imatrix"], extra)
        keep += [entries, buffers]
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    if job["overrides"]:
        entries = overrides_array(llama_cpp, job["overrides"])
        keep.append(entries)
        params.tt_overrides = ctypes.cast(entries, type(params.tt_overrides))
    # llama.cpp logs ~300 lines per quantization on stderr.
    with suppress_stdout_stderr(disable=LLAMA_VERBOSE):
        rc = llama_cpp.llama_model_quantize(job["input"].encode(), job["output"].encode(), params)
    return 0 if rc == 0 else QUANTIZE_FAILED
