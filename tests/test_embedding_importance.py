"""token_embd's importance (formats.embedding_importance): derived only where it is meant to be,
handed to llama.cpp's own quantizer, which then writes exactly ggml's importance-weighted rounding
of token_embd (and nothing else differs), with less error where the first block reads it; and the
mix's costs and files use it."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import Keys

from conftest import make_gguf
from nkat_gguf.formats.embedding_importance import EMBEDDING, FIRST_NORM, embedding_importance
from nkat_gguf.formats.gguf_io import copy_metadata, copy_tensor_info, field_value, open_gguf, start_data, write_gguf
from nkat_gguf.runtime import ggml_quants
from nkat_gguf.runtime.quantize import quantize_model


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory, reference_model):
    """The demo model (whose output is tied to token_embd) with an output.weight of its own: a copy
    of token_embd's bytes, so llama.cpp loads it as an untied model."""
    base = open_gguf(reference_model)
    path = tmp_path_factory.mktemp("untied") / "untied.gguf"
    embd = next(t for t in base.tensors if t.name == EMBEDDING)
    with write_gguf(path, str(field_value(base, Keys.General.ARCHITECTURE)),
                    alignment=int(field_value(base, Keys.General.ALIGNMENT, 32))) as writer:
        copy_metadata(writer, base)
        for t in base.tensors:
            copy_tensor_info(writer, t)
        writer.add_tensor_info("output.weight", embd.data.shape, embd.data.dtype, embd.data.nbytes, embd.tensor_type)
        start_data(writer)
        for t in base.tensors:
            writer.write_tensor_data(t.data)
        writer.write_tensor_data(embd.data)
    return path


def rows_of(tensor) -> np.ndarray:
    n_in = int(tensor.shape[0])
    return ggml_quants.dequantize_rows(tensor.tensor_type, np.asarray(tensor.data).view(np.uint8).reshape(
        int(tensor.shape[1]), -1), n_in)


def test_derived_only_for_an_untied_model_with_a_matching_norm(tmp_path, reference_model, untied_model):
    gamma = np.linspace(0.5, 2.0, 32).astype(np.float32)
    embd = np.ones((10, 32), np.float32)
    untied = make_gguf(tmp_path / "a.gguf", {EMBEDDING: embd, FIRST_NORM: gamma, "output.weight": embd})
    np.testing.assert_array_equal(embedding_importance(str(untied))[EMBEDDING], gamma ** 2)
    tied = make_gguf(tmp_path / "b.gguf", {EMBEDDING: embd, FIRST_NORM: gamma})
    narrow = make_gguf(tmp_path / "c.gguf", {EMBEDDING: embd, FIRST_NORM: gamma[:16], "output.weight": embd})
    assert embedding_importance(str(tied)) == {} and embedding_importance(str(narrow)) == {}
    assert embedding_importance(str(reference_model)) == {}  # the demo ties its output to token_embd
    assert EMBEDDING in embedding_importance(str(untied_model))


def test_llamacpp_writes_ggml_weighted_rounding_of_token_embd(untied_model, tmp_path):
    """Both files from llama.cpp's quantizer; token_embd is Q4_0 (its rows are 576 wide)."""
    overrides = {r"^token_embd\.weight$": "q4_0"}
    plain = quantize_model(str(untied_model), str(tmp_path / "plain.gguf"), "q8_0", overrides=overrides)
    weighted = quantize_model(str(untied_model), str(tmp_path / "weighted.gguf"), "q8_0", overrides=overrides,
                              weigh_embedding=True)
    assert plain["embedding_importance"] is None and weighted["embedding_importance"] == FIRST_NORM
    ref = {t.name: t for t in open_gguf(untied_model).tensors}
    a = {t.name: t for t in open_gguf(plain["output"]).tensors}
    b = {t.name: t for t in open_gguf(weighted["output"]).tensors}
    importance = embedding_importance(str(untied_model))[EMBEDDING]
    rows = rows_of(ref[EMBEDDING])

    def stored(t):
        return np.asarray(t.data).view(np.uint8).reshape(-1)

    assert a[EMBEDDING].tensor_type.name == b[EMBEDDING].tensor_type.name == "Q4_0"
    np.testing.assert_array_equal(stored(a[EMBEDDING]), ggml_quants.quantize_rows("Q4_0", rows).reshape(-1))
    np.testing.assert_array_equal(stored(b[EMBEDDING]), ggml_quants.quantize_rows("Q4_0", rows, importance).reshape(-1))
    assert not np.array_equal(stored(a[EMBEDDING]), stored(b[EMBEDDING]))
    assert all(np.array_equal(stored(a[n]), stored(b[n])) for n in a if n != EMBEDDING)

    def weighted_error(t):
        return float((((rows_of(t) - rows) ** 2) * importance).sum())

    assert weighted_error(b[EMBEDDING]) < weighted_error(a[EMBEDDING])


def test_mix_costs_and_files_weigh_token_embd(untied_model, tmp_path):
    from nkat_gguf.recipe.build import MixBuilder
    from nkat_gguf.recipe.costs import Statistics

    stats = Statistics(reference=str(untied_model))
    importance = embedding_importance(str(untied_model))[EMBEDDING]
    np.testing.assert_array_equal(stats.importance(EMBEDDING), importance)
    assert Statistics().key() != stats.key()
    assert Statistics(reference=str(untied_model)).importance("blk.0.attn_q.weight") is None
    builder = MixBuilder(str(untied_model), None, tmp_path / "work", rows=8, types=["Q4_0", "Q8_0", "IQ4_NL"],
                         threads=2, quiet=True)
    assert "IQ4_NL" in builder.costs[EMBEDDING].options  # needs an importance: offered with this one
    recipe = {n: "Q8_0" for n in builder.layout.allocated} | {EMBEDDING: "Q4_0"}
    path = builder.write(recipe)
    written = next(t for t in open_gguf(path).tensors if t.name == EMBEDDING)
    ref = next(t for t in open_gguf(untied_model).tensors if t.name == EMBEDDING)
    np.testing.assert_array_equal(np.asarray(written.data).view(np.uint8).reshape(-1),
                                  ggml_quants.quantize_rows("Q4_0", rows_of(ref), importance).reshape(-1))
