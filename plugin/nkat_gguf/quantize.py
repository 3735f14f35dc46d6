"""A lower-bit copy of a GGUF model made by llama.cpp's own quantizer (requantizing allowed)."""

from __future__ import annotations

import os

from .atomic import atomic_path
from .errors import UserError
from .gguf_io import open_gguf
from .output_paths import check_output_path


def ftype_names(lib) -> dict[str, int]:
    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {k[len(prefix):].lower(): getattr(lib, k) for k in dir(lib) if k.startswith(prefix)}


def quantize_model(input_path: str, output_path: str, qtype: str = "q4_0", threads: int | None = None) -> dict:
    import llama_cpp

    open_gguf(input_path)  # a clear error for missing / non-GGUF input
    check_output_path(output_path, [input_path], "--output")
    names = ftype_names(llama_cpp)
    if qtype.lower() not in names:
        raise UserError(f"--type {qtype!r} is not a llama.cpp quant type; one of: {', '.join(sorted(names))}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = names[qtype.lower()]
    params.allow_requantize = True
    params.nthread = threads or (os.cpu_count() or 1)
    from llama_cpp._utils import suppress_stdout_stderr

    from .runtime import LLAMA_VERBOSE

    with atomic_path(output_path) as tmp:
        # llama.cpp logs ~300 lines per quantization on stderr.
        with suppress_stdout_stderr(disable=LLAMA_VERBOSE):
            rc = llama_cpp.llama_model_quantize(str(input_path).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise UserError(f"llama.cpp could not quantize {input_path} to {qtype} (status {rc})")
    reader = open_gguf(output_path)
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"input": str(input_path), "output": str(output_path), "type": qtype,
            "bytes": os.path.getsize(output_path), "tensor_types": types}
