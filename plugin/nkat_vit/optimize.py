"""nkat vit optimize: an Optuna study with the two-stage objective.

Stage 1 trains the trial's model on the gate dataset (CIFAR-10 by default, the bottleneck) and
computes its local TPE; below the gate (default 0.60) the trial is recorded as infeasible (an
Optuna constraint > 0) and stops there. Stage 2 trains it on the other datasets present and
returns the Global TPE (nkat_vit.metrics) over all of them: only feasible trials can win.

Storage, sampler seeding and the output files follow nkat optimize (the storage helpers are
nkat_gguf.optimize.study's; the plot is nkat_gguf.optimize.outputs.write_plot):
  optimization_history.json  every trial: parameters, per-dataset accuracy / TPE, Global TPE,
                             Consistency, Robustness, feasibility
  optuna_study.json          the study summary (datasets present, gate, best trial, verdict)
  optimization_results.png   optuna's history / importances / slices
  best_config.json           the best feasible trial's model and training settings and a
                             `nkat vit train` command per dataset that reproduces it
"""

from __future__ import annotations

import shlex
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nkat_gguf.util.atomic import write_text_atomic
from nkat_gguf.util.output_paths import check_output_dir
from nkat_gguf.util.work_dir import work_dir
from nkat_gguf.errors import UserError
from nkat_gguf.optimize.study import default_storage_url, open_storage, quiet_interrupted_trial, redact
from nkat_gguf.optimize.outputs import write_plot
from nkat_gguf.util.report import progress, say, to_json

from . import metrics
from .data import ImageData, load_dataset, subset
from .config import STEMS, TrainConfig, ViTConfig
from .train import train

HISTORY = "optimization_history.json"
SUMMARY = "optuna_study.json"
PLOT = "optimization_results.png"
BEST = "best_config.json"
ATTR_SETUP = "nkat_vit_setup"
DEFAULT_STUDY_NAME = "nkat-vit"

# The "round 2" space (sized for a GPU) and a CPU-sized one with the same axes.
SPACES = {
    "round2": {"patch": [2, 4], "stem": list(STEMS), "dim": [384, 512, 32], "depth": [5, 9],
               "heads": 8, "temperature": [0.6, 1.0], "top_p": [0.80, 0.95], "nkat_strength": [1e-4, 1e-2]},
    "quick": {"patch": [2, 4], "stem": list(STEMS), "dim": [32, 96, 16], "depth": [2, 4],
              "heads": 4, "temperature": [0.6, 1.0], "top_p": [0.80, 0.95], "nkat_strength": [1e-4, 1e-2]},
}


@dataclass
class VitOptimizeOptions:
    datasets: list[str]
    output_dir: str
    data_dir: str | None = None
    gate: tuple[str, float] | None = ("cifar10", 0.60)
    trials: int = 12
    space: str | dict = "quick"  # a name in SPACES, or a dict of the same shape
    epochs: int = 2
    train_limit: int | None = None
    test_limit: int | None = None
    storage: str | None = None
    study_name: str = DEFAULT_STUDY_NAME
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False
    train_overrides: dict = field(default_factory=dict)


def suggest(trial, space: dict) -> dict:
    """The trial's model settings."""
    low, high, step = space["dim"]
    return {
        "patch": trial.suggest_categorical("patch", space["patch"]),
        "stem": trial.suggest_categorical("stem", space["stem"]),
        "dim": trial.suggest_int("dim", low, high, step=step),
        "depth": trial.suggest_int("depth", *space["depth"]),
        "heads": space["heads"],
        "temperature": trial.suggest_float("temperature", *space["temperature"]),
        "top_p": trial.suggest_float("top_p", *space["top_p"]),
        "nkat_strength": trial.suggest_float("nkat_strength", *space["nkat_strength"], log=True),
    }


def objective_figures(per_dataset: dict[str, dict], gate: tuple[str, float] | None) -> dict:
    """The two-stage figures from per-dataset results {name: {accuracy, parameters, robustness}}."""
    acc = {d: r["accuracy"] for d, r in per_dataset.items()}
    params = {d: r["parameters"] for d, r in per_dataset.items()}
    tpes = {d: metrics.tpe(acc[d], params[d]) for d in per_dataset}
    rob = [r["robustness"] for r in per_dataset.values() if r.get("robustness") is not None]
    out = {"accuracy": acc, "tpe": tpes, "parameters": params,
           "global_tpe": metrics.global_tpe(acc, params), "consistency": metrics.consistency(tpes),
           "robustness": statistics.fmean(rob) if rob else None, "datasets": sorted(per_dataset)}
    if gate is not None:
        name, bar = gate
        out["gate"] = {"dataset": name, "tpe_min": bar, "tpe": tpes.get(name)}
        out["feasible"] = tpes.get(name) is not None and tpes[name] >= bar
    else:
        out["feasible"] = True
    return out


class VitOptimizer:
    def __init__(self, opts: VitOptimizeOptions):
        if isinstance(opts.space, str) and opts.space not in SPACES:
            raise UserError(f"--space must be one of {', '.join(SPACES)}, not {opts.space!r}")
        self.space = SPACES[opts.space] if isinstance(opts.space, str) else dict(opts.space)
        if opts.trials <= 0 or opts.epochs <= 0:
            raise UserError("--trials and --epochs must be positive")
        self.opts = opts
        self.out = Path(opts.output_dir)
        check_output_dir(self.out)
        self.storage_url = opts.storage or default_storage_url(self.out)
        # A given storage is checked before any data is loaded (the default one lives in --output-dir,
        # which run_optimize creates).
        self.storage = open_storage(opts.storage) if opts.storage else None
        self.data: dict[str, ImageData] = {}
        for name in opts.datasets:
            self.data[name] = subset(load_dataset(name, opts.data_dir), opts.train_limit, opts.test_limit)
        if opts.gate is not None and opts.gate[0] not in self.data:
            raise UserError(f"--gate {opts.gate[0]}: that dataset is not among --datasets ({', '.join(self.data)})")
        # the gate dataset first: stage 1
        self.order = sorted(self.data, key=lambda d: (opts.gate is None or d != opts.gate[0], opts.datasets.index(d)))
        self.train_cfg = TrainConfig.from_dict(TrainConfig().to_dict() | {"epochs": opts.epochs, "seed": opts.seed}
                                               | opts.train_overrides)
        self.train_cfg.validate()

    def setup(self) -> dict:
        o = self.opts
        return {"datasets": {d: self.data[d].describe() for d in self.order},
                "gate": list(o.gate) if o.gate else None,
                "space": o.space if isinstance(o.space, str) else "custom", "search_space": self.space,
                "train_config": self.train_cfg.to_dict()}

    def open_study(self):
        import json

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = self.storage or open_storage(self.storage_url)
        setup = json.loads(json.dumps(self.setup()))
        sampler = optuna.samplers.TPESampler(n_startup_trials=min(10, max(3, self.opts.trials // 3)),
                                             seed=self.opts.seed)
        names = {s.study_name for s in storage.get_all_studies()}
        if self.opts.study_name in names:
            study = optuna.load_study(study_name=self.opts.study_name, storage=storage, sampler=sampler)
            if study.user_attrs.get(ATTR_SETUP) != setup:
                raise UserError(f"study {self.opts.study_name!r} in {redact(self.storage_url)} was run with other "
                                "datasets, gate, space or training settings; choose another --study-name")
        else:
            study = optuna.create_study(storage=storage, study_name=self.opts.study_name, direction="maximize",
                                        sampler=sampler)
            study.set_user_attr(ATTR_SETUP, setup)
        self.study = study
        return study

    def objective(self, trial) -> float:
        o = self.opts
        model = suggest(trial, self.space)
        trial.set_user_attr("model", model)
        started = time.perf_counter()
        per_dataset = {}
        for stage, name in enumerate(self.order, start=1):
            res = train(self.data[name], ViTConfig.from_dict(ViTConfig().to_dict() | model), self.train_cfg,
                        device=o.device, threads=o.threads, quiet=True)
            per_dataset[name] = {"accuracy": res["test_accuracy"], "parameters": res["parameters"],
                                 "robustness": res.get("robustness")}
            figures = objective_figures(per_dataset, o.gate)
            if stage == 1 and not figures["feasible"]:
                break  # stage 1 failed: the other datasets are not worth training
        figures["stage"] = 2 if figures["feasible"] else 1
        figures["trial_seconds"] = time.perf_counter() - started
        trial.set_user_attr("figures", figures)
        if o.gate is not None:
            trial.set_constraint("gate_tpe", o.gate[1] - figures["gate"]["tpe"])
        return float(figures["global_tpe"])

    def run(self) -> dict:
        import optuna
        from optuna.trial import TrialState

        study = self.open_study()
        say(f"nkat vit optimize: {self.opts.trials} trials on {', '.join(self.opts.datasets)}", self.opts.quiet)
        done = lambda: sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))  # noqa: E731
        bar = progress(total=self.opts.trials, desc="trials", quiet=self.opts.quiet, unit="trial")
        bar.update(min(done(), self.opts.trials))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            while done() < self.opts.trials:
                with quiet_interrupted_trial():
                    study.optimize(self.objective, n_trials=1, gc_after_trial=True)
                bar.update(1)
                self.write_history()
        bar.close()
        return self.finish()

    def rows(self) -> list[dict]:
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            f = t.user_attrs.get("figures") or {}
            rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                         "model": t.user_attrs.get("model"), "global_tpe": t.value if t.values else None,
                         "feasible": (all(v <= 0 for v in t.constraints.values())
                                      if t.state.name == "COMPLETE" else None),
                         "constraints": dict(t.constraints)}
                        | {k: f.get(k) for k in ("stage", "accuracy", "tpe", "parameters", "consistency",
                                                  "robustness", "gate", "trial_seconds")})
        return rows

    def write_history(self) -> list[dict]:
        rows = self.rows()
        write_text_atomic(self.out / HISTORY, to_json(rows) + "\n")
        return rows

    def finish(self) -> dict:
        rows = self.write_history()
        feasible = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"]]
        best = max(feasible, key=lambda r: (r["global_tpe"], -r["number"]), default=None)
        files = [HISTORY, SUMMARY]
        plot = write_plot(self.study, self.out / PLOT)
        if plot:
            files.append(plot)
        if best is not None:
            best_doc = {"trial": best["number"], "global_tpe": best["global_tpe"], "accuracy": best["accuracy"],
                        "tpe": best["tpe"], "consistency": best["consistency"], "robustness": best["robustness"],
                        "model_config": best["model"], "train_config": self.train_cfg.to_dict(),
                        "commands": {d: shlex.join(self.train_command(d, best["model"])) for d in self.order}}
            write_text_atomic(self.out / BEST, to_json(best_doc) + "\n")
            files.append(BEST)
        elif (self.out / BEST).exists():
            (self.out / BEST).unlink()
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        gate = self.opts.gate
        summary = {
            "study_name": self.opts.study_name, "storage": redact(self.storage_url), "direction": "maximize",
            "objective": "Global TPE = mean accuracy / log10(1 + 9 (1 + parameters / 1e6)) over the datasets "
                         "present" + (f", counted only when TPE on {gate[0]} >= {gate[1]:g}" if gate else ""),
            "datasets_present": self.order, "gate": list(gate) if gate else None,
            "trials_target": self.opts.trials, "trials": counts,
            "feasible_trials": len(feasible), "best_trial": best,
            "verdict": (f"trial {best['number']} is the best feasible trial: Global TPE {best['global_tpe']:.4f}"
                        if best else "no trial passed the gate: no best configuration written"),
            "setup": self.setup(), "files": files,
        }
        write_text_atomic(self.out / SUMMARY, to_json(summary) + "\n")
        summary["output_dir"] = str(self.out)
        return summary

    def train_command(self, dataset: str, model: dict) -> list[str]:
        o = self.opts
        cmd = ["nkat", "vit", "train", "--dataset", dataset, "--epochs", str(o.epochs), "--seed", str(o.seed)]
        if o.data_dir:
            cmd += ["--data-dir", o.data_dir]
        if o.train_limit:
            cmd += ["--train-limit", str(o.train_limit)]
        if o.test_limit:
            cmd += ["--test-limit", str(o.test_limit)]
        for key in ("patch", "stem", "dim", "depth", "heads", "temperature", "top_p", "nkat_strength"):
            cmd += [f"--{key.replace('_', '-')}", str(model[key])]
        return cmd


def run_optimize(opts: VitOptimizeOptions) -> dict:
    optimizer = VitOptimizer(opts)
    with work_dir(opts.output_dir, "--output-dir"):  # removed again if the run fails before writing into it
        return optimizer.run()
