"""quickstart's decision on the native self-test: a kernel that disagrees with numpy is not used."""

from __future__ import annotations

from nkat_gguf.jobs import quickstart
from nkat_gguf.errors import UserError
from nkat_gguf.runtime import native
from nkat_gguf.runtime.settings import RuntimeSettings


def run_calibration(tmp_path, reference_model, quiet=True):
    return quickstart.calibrate_if_possible(str(reference_model), tmp_path, RuntimeSettings(ctx=64, threads=1),
                                            chunks=1, quiet=quiet)


def test_failed_self_test_skips_the_native_step_with_one_warning(tmp_path, reference_model, monkeypatch, capsys):
    real = native.self_test()
    assert real["ok"], real  # this machine's kernel is fine; the disagreement below is the case under test
    monkeypatch.setattr(native, "self_test", lambda: real | {"ok": False, "max_rel_err": 0.25})
    assert run_calibration(tmp_path, reference_model) is None
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "failed its self-test" in err and "differs from numpy by 0.25" in err and "lora backend" in err
    assert list(tmp_path.iterdir()) == []  # no activation statistics were collected


def test_abi_mismatch_is_named(tmp_path, reference_model, monkeypatch, capsys):
    real = native.self_test()
    monkeypatch.setattr(native, "self_test", lambda: real | {"ok": False, "abi": "ggml_tensor size 336 != 368"})
    assert run_calibration(tmp_path, reference_model) is None
    assert "ABI: ggml_tensor size 336 != 368" in capsys.readouterr().err


def test_passing_self_test_goes_on_to_calibration(tmp_path, reference_model, monkeypatch, capsys):
    def no_text():
        raise UserError("no calibration text here")

    monkeypatch.setattr(quickstart, "find_calibration_text", no_text)
    assert run_calibration(tmp_path, reference_model, quiet=False) is None
    # past the check, the step stopped at the missing text
    assert capsys.readouterr().err == "activation-scaled theta skipped: no calibration text here\n"
