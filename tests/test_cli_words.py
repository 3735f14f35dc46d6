"""Layers below commands/ refuse settings by name (errors.BadSetting); the command words the error
with its own flags. nkat optimize's checks run before any model is loaded, so these are cheap."""

import pytest

from nkat_gguf.cli import main
from nkat_gguf.errors import BadSetting
from nkat_gguf.optimize.options import OptimizeOptions, trial_budget
from nkat_gguf.optimize.study import Optimizer


def unused_rerun(facts):
    raise AssertionError("no study runs here")


@pytest.mark.parametrize("changes", [{"chunks": 0}, {"final_chunks": -1}, {"study_name": " "}, {"max_kld": 0.1},
                                     {"target_rank": 0}, {"imatrix": "x.imatrix"}])
def test_the_study_refuses_settings_without_cli_words(tmp_path, changes):
    opts = OptimizeOptions(model="m.gguf", output_dir=str(tmp_path), text="t.txt", **changes)
    with pytest.raises(BadSetting) as refused:
        Optimizer(opts, unused_rerun)
    assert "--" not in str(refused.value)
    with pytest.raises(BadSetting) as refused:
        trial_budget("quick", 5)
    assert "--" not in str(refused.value)


@pytest.mark.parametrize("flags, words", [
    (["--chunks", "0"], "--chunks must be at least 1, not 0"),
    (["--final-chunks", "-1"], "--final-chunks must be 0 (off) or more, not -1"),
    (["--study-name", " "], "--study-name must not be empty"),
    (["--max-kld", "0.1"], "--max-kld needs --reference (KL-divergence is measured against it)"),
    (["--target-rank", "0"], "--target-rank must be positive, not 0"),
    (["--mode", "quick", "--trials", "5"], "--trials is for --mode custom (--mode quick runs 12 trials)"),
    (["--mode", "custom"], "--mode custom needs --trials N (a positive number)"),
])
def test_nkat_optimize_words_them_with_its_flags(tmp_path, capsys, reference_model, flags, words):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    rc = main(["optimize", "--model", str(reference_model), "--text", str(text), "--output-dir", str(tmp_path / "o"),
               *flags])
    err = capsys.readouterr().err
    assert rc == 2 and words in err, err
    assert not (tmp_path / "o").exists()
