"""NKAT-ViT training end to end on the digits set (tiny models, an epoch or a few): learning,
exact resume from an atomic checkpoint, the metrics JSON, the two-stage optimize, bad input."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from conftest import REPO  # noqa: E402
from nkat_vit.config import TrainConfig, ViTConfig  # noqa: E402
from nkat_vit.data import load_dataset, subset  # noqa: E402
from nkat_vit.optimize import VitOptimizeOptions, objective_figures, run_optimize  # noqa: E402
from nkat_vit.train import load_checkpoint, train  # noqa: E402
from test_vit_data import write_mnist_like  # noqa: E402

TINY = ViTConfig(stem="tiny", patch=1, dim=16, heads=2, depth=1, nkat_strength=0.05, nkat_rank=2)


def nkat(*args, env_extra=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin")) | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "nkat_gguf.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_user_error(done, *words):
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_resume_from_checkpoint_equals_uninterrupted_training(tmp_path):
    data = subset(load_dataset("digits"), 160, 60)
    # every augmentation on, so the per-epoch generators are exercised too
    cfg = TrainConfig(epochs=2, batch_size=32, randaugment_n=2, cutmix=0.3, mixup=0.3, cutout=2, seed=5)
    whole = train(data, TINY, cfg, checkpoint=tmp_path / "whole.pt", threads=1, quiet=True, robustness=False)
    first = train(data, TINY, cfg, checkpoint=tmp_path / "split.pt", threads=1, quiet=True, robustness=False,
                  stop_after_epochs=1)
    assert not first["finished"] and load_checkpoint(tmp_path / "split.pt")["epoch"] == 1
    resumed = train(data, TINY, cfg, checkpoint=tmp_path / "split.pt", resume=True, threads=1, quiet=True,
                    robustness=False)
    assert resumed["finished"] and resumed["epochs_done"] == 2
    a, b = load_checkpoint(tmp_path / "whole.pt"), load_checkpoint(tmp_path / "split.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert not list(tmp_path.glob("*.partial"))
    # another seed really trains differently (the comparison above is not vacuous)
    other = train(data, TINY, TrainConfig(**(cfg.to_dict() | {"seed": 6})), threads=1, quiet=True, robustness=False)
    assert other["history"][-1]["loss"] != whole["history"][-1]["loss"]


def test_train_cli_learns_digits_and_eval_agrees(tmp_path):
    ckpt, out = tmp_path / "d.pt", tmp_path / "d.json"
    done = nkat("vit", "train", "--dataset", "digits", "--stem", "tiny", "--patch", "1", "--dim", "32", "--heads", "2",
                "--depth", "2", "--epochs", "4", "--batch-size", "32", "--lr", "3e-3", "--threads", "1",
                "--checkpoint", ckpt, "--output", out, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result == json.loads(out.read_text())
    assert result["test_accuracy"] >= 0.9, result["history"]  # chance is 0.10; 0.958 measured here
    assert result["dataset"]["name"] == "digits" and result["epochs_done"] == 4 and result["finished"]
    assert result["theta_parameters"] > 0 and result["parameters"] > result["theta_parameters"]
    assert result["tpe"] == pytest.approx(result["test_accuracy"] / __import__("math").log10(1 + result["lambda"]))
    assert set(result["corrupted_accuracy"]) == {"gaussian_noise", "blur", "contrast", "shift", "occlusion"}
    assert result["robustness"] == pytest.approx(
        sum(result["corrupted_accuracy"].values()) / 5 / result["test_accuracy"])
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    ev = nkat("vit", "eval", "--checkpoint", ckpt, "--threads", "1", "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluated = json.loads(ev.stdout)
    assert evaluated["test_accuracy"] == result["test_accuracy"]
    assert evaluated["robustness"] == pytest.approx(result["robustness"])


def test_two_stage_figures_mark_the_gate():
    per = {"cifar10": {"accuracy": 0.55, "parameters": 1_000_000}, "mnist": {"accuracy": 0.99, "parameters": 990_000}}
    fig = objective_figures(per, ("cifar10", 0.40))
    assert fig["tpe"]["cifar10"] == pytest.approx(0.55 / 1.2787536, rel=1e-6)  # 0.4301
    assert fig["feasible"] and fig["gate"]["tpe"] == fig["tpe"]["cifar10"]
    assert not objective_figures(per, ("cifar10", 0.45))["feasible"]
    assert fig["global_tpe"] == pytest.approx(0.77 / __import__("math").log10(1 + 9 * 1.995))
    assert objective_figures(per, None)["feasible"]


def test_optimize_two_stage_end_to_end(tmp_path):
    write_mnist_like(tmp_path / "data" / "mnist", n_train=64, n_test=32)
    space = {"patch": [4], "stem": ["off", "tiny"], "dim": [16, 32, 16], "depth": [1, 1], "heads": 2,
             "temperature": [0.6, 1.0], "top_p": [0.8, 0.95], "nkat_strength": [1e-4, 1e-2]}  # small: seconds
    common = dict(datasets=["digits", "mnist"], data_dir=str(tmp_path / "data"), trials=2, epochs=1, train_limit=120,
                  test_limit=60, threads=1, quiet=True, space=space)
    # an impossible bar (TPE <= accuracy <= 1): stage 1 fails, mnist is never trained, nothing wins
    closed = run_optimize(VitOptimizeOptions(output_dir=str(tmp_path / "closed"), gate=("digits", 1.5), **common))
    hist = json.loads((tmp_path / "closed" / "optimization_history.json").read_text())
    assert [r["state"] for r in hist] == ["COMPLETE", "COMPLETE"]
    assert all(r["feasible"] is False and r["stage"] == 1 and list(r["accuracy"]) == ["digits"] for r in hist)
    assert all(r["constraints"]["gate_tpe"] > 0 for r in hist)
    assert closed["best_trial"] is None and "no trial passed" in closed["verdict"]
    assert not (tmp_path / "closed" / "best_config.json").exists()
    # an open bar: both stages run, Global TPE over both datasets, the best config is written
    opened = run_optimize(VitOptimizeOptions(output_dir=str(tmp_path / "open"), gate=("digits", 0.0), **common))
    hist = json.loads((tmp_path / "open" / "optimization_history.json").read_text())
    assert all(r["feasible"] and r["stage"] == 2 and set(r["accuracy"]) == {"digits", "mnist"} for r in hist)
    assert all(r["consistency"] is not None for r in hist)
    best = json.loads((tmp_path / "open" / "best_config.json").read_text())
    assert best["global_tpe"] == max(r["global_tpe"] for r in hist)
    assert set(best["commands"]) == {"digits", "mnist"} and "nkat vit train" in best["commands"]["digits"]
    for name in ("optuna_study.json", "optimization_results.png", "optuna_study.db"):
        assert (tmp_path / "open" / name).is_file(), name
    assert opened["datasets_present"] == ["digits", "mnist"]
    # rerunning resumes the study: the budget is already met, no new trial
    again = run_optimize(VitOptimizeOptions(output_dir=str(tmp_path / "open"), gate=("digits", 0.0), **common))
    assert again["trials"] == {"COMPLETE": 2}


def _main_error(capsys, *args):
    """nkat's main() in this process: (exit status, stderr lines)."""
    from nkat_gguf.cli import main

    status = main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return status, err


@pytest.mark.parametrize("args, word", [
    (("vit", "train", "--dataset", "mnist", "--data-dir", "{tmp}"), "mnist"),
    (("vit", "train", "--resume"), "--resume"),
    (("vit", "train", "--dim", "30", "--heads", "4"), "heads"),
    (("vit", "train", "--cutmix", "0.8", "--mixup", "0.5"), "cutmix"),
    (("vit", "eval", "--checkpoint", "{tmp}/garbage.pt"), "garbage.pt"),
    (("vit", "eval", "--checkpoint", "{tmp}/missing.pt"), "missing.pt"),
    (("vit", "optimize", "--output-dir", "{tmp}/o", "--gate", "cifar"), "--gate"),
    (("vit", "optimize", "--output-dir", "{tmp}/o", "--datasets", "imagenet"), "imagenet"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, word):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    status, err = _main_error(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert status == 2 and len(err) == 1 and word in err[0] and err[0].startswith("nkat vit: error:"), err
    assert not list(tmp_path.rglob("*.partial"))


def test_gguf_side_never_imports_torch_and_missing_torch_is_a_user_error(tmp_path):
    probe = ("import sys; from nkat_gguf.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'nkat_vit.train', 'nkat_vit.model') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "plugin")))
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    # torch made unimportable (a None entry in sys.modules, as Python does for a blocked module)
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    done = nkat("vit", "train", env_extra={"PYTHONPATH": f"{block}{os.pathsep}{REPO / 'plugin'}"})
    assert_user_error(done, "torch", "[vit]")
