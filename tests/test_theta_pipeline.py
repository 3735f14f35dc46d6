"""nkat optimize's trials and nkat convert share one theta pipeline (theta/pipeline.py): what a
trial predicts a configuration's theta costs is what nkat convert writes for the same settings."""

import pytest

from nkat_gguf.formats.gguf_io import ModelFile
from nkat_gguf.formats.keys import NkatKeys
from nkat_gguf.formats.nkat_format import read_layout, read_meta
from nkat_gguf.optimize.space import GROUPS
from nkat_gguf.optimize.trials import FactorCache
from nkat_gguf.theta.convert import RANK_SEARCH_FACTOR, ConvertOptions, convert

LAYERS = ["blk.1.*", "blk.2.*"]
RANK = 8


@pytest.fixture(scope="module")
def cache(base_model, reference_model):
    """One study's factor cache for both cases, as one study serves all its trials."""
    model, ref = ModelFile(base_model), ModelFile(reference_model)
    # the study's SVDs at the rank nkat convert searches a budget at, so both cut the same factors
    return FactorCache(model, ref, model.target_names(LAYERS), RANK * RANK_SEARCH_FACTOR, None, quiet=True)


@pytest.mark.parametrize("allocation, structure", [("uniform", "general"), ("budget", "auto")])
def test_optimizer_predicts_the_bytes_nkat_convert_writes(cache, base_model, reference_model, tmp_path, allocation,
                                                          structure):
    config = {"source": "residual", "structure": structure, "rank": RANK, "gamma": 2.0, "groups": list(GROUPS),
              "allocation": allocation}
    predicted = cache.predicted_bytes(config)
    budget = cache.budget_of(config)
    assert (budget is None) == (allocation == "uniform")

    trial = tmp_path / "trial.nkat"
    assert cache.write(trial, config, 2.0) == predicted
    # the budget as the study's convert command passes it (commands/rerun.py: repr of MiB)
    budget_mb = None if budget is None else float(repr(budget / 2**20))
    out = tmp_path / "convert.nkat"
    summary = convert(str(base_model), str(out), ConvertOptions(
        rank=RANK, source="residual", structure=structure, reference=str(reference_model), layers=LAYERS,
        budget_mb=budget_mb, quiet=True))
    assert summary.theta_bytes == predicted == read_meta(out).theta_bytes
    assert summary.budget_bytes == budget
    _, trial_pairs = read_layout(trial)
    assert summary.ranks == {name: int(a.shape[1]) for name, (a, _) in trial_pairs.items()}
    assert read_meta(trial).extra[NkatKeys.Extra.RANK_ALLOCATION] == allocation
    if budget is not None:
        assert out.stat().st_size <= budget
        assert summary.stored_rank_min != summary.stored_rank_max  # the cut moved bytes between matrices
