"""Per-type generation speed measured in llama.cpp (measure.type_speed): the timing models are
what they claim (cut to their blocks, every block matrix in the type where it fits) and llama.cpp
runs them; a file's predicted time is the reference's plus weights x cost differences; the
measurement is cached. No figure of speed is asserted here: speed lives in the benchmarks."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import Keys

from conftest import make_gguf
from nkat_gguf.errors import UserError
from nkat_gguf.formats.gguf_io import field_value, open_gguf
from nkat_gguf.measure.type_speed import BASE_TYPE, TypeSpeed, measure_type_speed, write_timing_model
from nkat_gguf.recipe.candidates import is_allocated
from nkat_gguf.runtime.engine import Runtime
from nkat_gguf.runtime.ggml_quants import fits_rows
from nkat_gguf.runtime.settings import RuntimeSettings


def test_predicted_seconds_is_the_reference_plus_weights_times_cost_differences():
    speed = TypeSpeed(cost={"Q8_0": 0.0, "Q4_K": -2e-9, "IQ3_S": 3e-9}, reference_seconds=0.05,
                      reference_types={"token_embd.weight": "Q4_K", "a": "Q4_K", "b": "Q8_0"},
                      weights={"token_embd.weight": 10**8, "a": 10**6, "b": 2 * 10**6}, facts={})
    assert speed.predicted_seconds({"token_embd.weight": "Q4_K", "a": "Q4_K", "b": "Q8_0"}) == 0.05
    want = 0.05 + 10**6 * (3e-9 - -2e-9) + 2 * 10**6 * (-2e-9 - 0.0)
    # token_embd is a row lookup: its type costs nothing
    assert speed.predicted_seconds({"token_embd.weight": "IQ3_S", "a": "IQ3_S", "b": "Q4_K"}) == pytest.approx(want)
    assert speed.predicted_seconds({"a": "Q6_K"}) is None  # not measured
    assert speed.tensor_seconds("token_embd.weight", "IQ3_S") == 0.0
    assert speed.tensor_seconds("b", "Q4_K") == pytest.approx(-4e-3)


@pytest.mark.parametrize("qtype", ["Q4_0", "IQ2_XXS"])
def test_timing_model_is_cut_to_its_blocks_typed_and_runs_in_llamacpp(reference_model, tmp_path, qtype):
    path = tmp_path / f"timing-{qtype}.gguf"
    in_type = write_timing_model(open_gguf(reference_model), qtype, 2, path)
    ref, model = open_gguf(reference_model), open_gguf(path)
    arch = field_value(ref, Keys.General.ARCHITECTURE)
    assert field_value(model, Keys.LLM.BLOCK_COUNT.format(arch=arch)) == 2
    kept = [t for t in ref.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < 2]
    assert [t.name for t in model.tensors] == [t.name for t in kept]
    counted = 0
    for t in model.tensors:
        if not is_allocated(t.name, len(t.shape)) or not t.name.startswith("blk."):
            continue
        fits = fits_rows(qtype, int(t.shape[0]))  # IQ2_XXS fits only ffn_down's 1536-wide rows here
        assert t.tensor_type.name == (qtype if fits else BASE_TYPE)
        counted += int(t.n_elements) if fits else 0
    assert in_type == counted > 0
    with Runtime(path, n_ctx=16, n_batch=4, n_threads=2) as rt:
        logits = rt.decode([1, 2], 0, logits_from=1)
    assert logits.shape == (1, rt.n_vocab) and np.isfinite(logits).all()


def test_type_speed_is_measured_once_and_predicts_the_reference(reference_model, tmp_path):
    types = ["Q4_0", "Q8_0", "IQ4_NL"]
    first = measure_type_speed(str(reference_model), types, tmp_path, RuntimeSettings(threads=2), quiet=True)
    ref_types = set(first.reference_types.values())  # Q4_1, measured as the reference's own type too
    assert set(first.cost) == set(types) | ref_types and first.cost[BASE_TYPE] == 0.0
    assert all(np.isfinite(v) for v in first.cost.values()) and first.reference_seconds > 0
    assert first.predicted_seconds(first.reference_types) == first.reference_seconds
    stored = list(tmp_path.glob("type-speed-*.json"))
    assert len(stored) == 1 and not list(tmp_path.glob("timing-models/*"))  # timing models deleted
    again = measure_type_speed(str(reference_model), types, tmp_path, RuntimeSettings(threads=2), quiet=True)
    assert again.cost == first.cost and again.reference_seconds == first.reference_seconds


def test_a_model_without_block_count_is_a_one_line_error(tmp_path):
    path = make_gguf(tmp_path / "tiny.gguf", {"blk.0.attn_q.weight": np.ones((64, 64))})
    with pytest.raises(UserError, match="llama.block_count"):
        measure_type_speed(str(path), ["Q8_0"], tmp_path, RuntimeSettings(threads=1), quiet=True)
    assert not list(tmp_path.glob("type-speed-*")) and not (tmp_path / "timing-models").exists()
