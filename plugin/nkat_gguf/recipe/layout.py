"""The bytes of a GGUF file written from the reference: header, then each tensor's data padded to
the file's alignment. What a recipe changes is the allocated tensors' data; the rest is fixed."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import Keys

from ..formats.gguf_io import field_value, open_gguf
from .candidates import is_allocated


@dataclass
class Layout:
    alignment: int
    header: int  # bytes before the first tensor's data
    fixed_tensors: int  # padded bytes of the tensors no recipe changes (norms, biases...)
    n_weights: int  # elements of every tensor (llama.cpp's bits per weight divide by this)
    allocated: list[str]

    def padded(self, n_bytes: int) -> int:
        return -(-int(n_bytes) // self.alignment) * self.alignment

    @property
    def fixed(self) -> int:
        return self.header + self.fixed_tensors


def read_layout(path) -> Layout:
    reader = open_gguf(path)
    align = int(field_value(reader, Keys.General.ALIGNMENT, 32))
    header = min(int(t.data_offset) for t in reader.tensors) if reader.tensors else 0
    fixed, allocated, n_weights = 0, [], 0
    for t in reader.tensors:
        n_weights += int(t.n_elements)
        if is_allocated(t.name, len(t.shape)):
            allocated.append(t.name)
        else:
            fixed += -(-int(t.n_bytes) // align) * align
    return Layout(align, header, fixed, n_weights, allocated)


def tensor_types(path) -> dict[str, str]:
    """name -> GGML type name of every tensor of a GGUF file."""
    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}
