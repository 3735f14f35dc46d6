"""A GGUF model assembled from two (or more) quantizations of the same model, tensor by tensor.

The base file's metadata and tensors are copied; each tensor named in `replacements` is taken,
bytes and type as stored, from the donor file given for it (e.g. a Q3_K file for a mixed-precision
control, the reference for attribution). Tensor data is streamed from memory maps, so memory
stays small whatever the model size. Written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from gguf import GGUFValueType, Keys

from ..errors import UserError
from .gguf_io import copy_metadata, copy_tensor_info, field_value, open_gguf, start_data, write_gguf


def _readers(base_path, replacements: dict[str, str]):
    base = open_gguf(base_path)
    donors = {}
    for path in sorted(set(map(str, replacements.values()))):
        donors[path] = open_gguf(path)
    return base, donors


def mixed_tensors(base_path, replacements: dict[str, str]):
    """(base reader, the assembled model's tensors in the base's order, each from the base or its donor)."""
    base, donors = _readers(base_path, replacements)
    by_donor = {path: {t.name: t for t in r.tensors} for path, r in donors.items()}
    out = []
    for t in base.tensors:
        donor = replacements.get(t.name)
        if donor is None:
            out.append(t)
            continue
        other = by_donor[str(donor)].get(t.name)
        if other is None:
            raise UserError(f"{donor}: has no tensor {t.name}")
        if tuple(other.shape) != tuple(t.shape):
            raise UserError(f"{donor}: {t.name} is {tuple(other.shape)}, the base's is {tuple(t.shape)}")
        out.append(other)
    unknown = set(replacements) - {t.name for t in base.tensors}
    if unknown:
        raise UserError(f"{base_path}: has no tensor {sorted(unknown)[0]}")
    return base, out


def assembled_size(base_path, replacements: dict[str, str]) -> int:
    """Bytes the assembled file will have (header as the base's, tensor data aligned)."""
    base, tensors = mixed_tensors(base_path, replacements)
    align = int(field_value(base, Keys.General.ALIGNMENT, 32))
    header = min(t.data_offset for t in base.tensors)
    return header + sum(-(-t.n_bytes // align) * align for t in tensors)


def write_mixed(base_path, replacements: dict[str, str], output_path, extra_meta: dict[str, str] | None = None) -> int:
    """Write base with `replacements` (tensor name -> donor GGUF path); return the file's bytes."""
    base, tensors = mixed_tensors(base_path, replacements)
    arch = str(field_value(base, Keys.General.ARCHITECTURE, "unknown"))
    with write_gguf(output_path, arch, alignment=int(field_value(base, Keys.General.ALIGNMENT, 32))) as writer:
        copy_metadata(writer, base)
        for key, value in (extra_meta or {}).items():
            writer.add_key_value(key, value, GGUFValueType.STRING)
        for t in tensors:
            copy_tensor_info(writer, t)
        start_data(writer)
        for t in tensors:
            writer.write_tensor_data(t.data)
    return os.path.getsize(output_path)


def tensor_bytes(path) -> dict[str, tuple[str, int]]:
    """name -> (GGML type name, stored bytes) for every tensor of a GGUF file."""
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in open_gguf(Path(path)).tensors}
