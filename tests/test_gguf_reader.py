"""formats.gguf_io.FastReader against gguf-py's own GGUFReader: the same fields, parts, indices,
types and contents, and the same tensors, on real files (a model with its tokenizer arrays, a
.nkat adapter, an imatrix)."""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader

from nkat_gguf.formats.gguf_io import FastReader


def assert_same(path) -> None:
    stock, fast = GGUFReader(path), FastReader(path)
    assert list(stock.fields) == list(fast.fields)
    for name, a in stock.fields.items():
        b = fast.fields[name]
        assert (a.offset, a.name, a.data, a.types) == (b.offset, b.name, b.data, b.types), name
        assert len(a.parts) == len(b.parts), name
        assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a.parts, b.parts)), name
        assert a.contents() == b.contents(), name
    assert stock.data_offset == fast.data_offset and stock.alignment == fast.alignment
    assert [(t.name, t.tensor_type, list(t.shape), t.n_bytes, t.data_offset) for t in stock.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.n_bytes, t.data_offset) for t in fast.tensors]


def test_model_with_tokenizer_arrays(reference_model):
    fields = FastReader(reference_model).fields
    assert len(fields["tokenizer.ggml.tokens"].data) > 10_000  # the arrays this reader is for
    assert_same(reference_model)


def test_adapter_and_imatrix(theta_r8, base_imatrix):
    assert_same(theta_r8)
    assert_same(base_imatrix)
