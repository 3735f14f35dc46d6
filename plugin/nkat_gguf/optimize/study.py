"""nkat optimize: an Optuna study for the theta with the best TPE (the seed's nkat_auto_optimizer).

One worker's lifecycle: check every input before anything is written, open or resume the study
(its search space and setup must match), score the reference and the baseline once, run trials
until the study holds its budget of COMPLETE trials (shared by all workers), then write the
outputs, re-evaluating the best trial on --final-chunks first. Objective: maximize
measure.tpe on a fixed set of chunks. Constraints (--max-kld, --max-overhead) go through
Optuna's constraint support: a trial over a bar is recorded with its figures but cannot win.
The search space is in space.py, a trial's work in trials.py, the storage and dead workers in
storage.py, the files in outputs.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BadSetting, Setting, UserError
from ..formats.gguf_io import ModelFile
from ..measure.evaluate import NonFiniteError, check_ctx, evaluate
from ..measure.rows import pick, score_row
from ..runtime.engine import BACKENDS, Runtime
from ..theta import lowrank as theta_math
from ..util.output_paths import check_output_dir
from ..util.redaction import scrub
from ..util.report import progress, say
from . import outputs
from .options import OptimizeOptions, trial_budget
from .space import GROUPS, SearchSpace, group_of, search_space_note
from ..util.study_storage import DB_NAME, default_storage_url, fail_dead_local, open_storage, redact, worker_id
from .trials import FactorCache, TrialRunner, TrialScorer, remove_stale_scratch

WAIT_POLL = 2.0
ATTR_SPACE = "nkat_search_space"
ATTR_SETUP = "nkat_setup"


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


@contextlib.contextmanager
def quiet_interrupted_trial():
    """Optuna logs a trial that Ctrl-C or SIGTERM interrupted as failed, with the traceback, before
    it re-raises; the command then prints one line for it (cli.dispatch). Within the block, Optuna's
    log records from that one on are dropped."""
    import logging

    class DropFromInterrupt(logging.Filter):
        interrupted = False

        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
                self.interrupted = True
            return not self.interrupted

    handlers = logging.getLogger("optuna").handlers
    drop = DropFromInterrupt()
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


# -- the study ------------------------------------------------------------------------------------
class Optimizer:
    """One worker of a study: validate, open/resume the study, run trials, write the outputs."""

    def __init__(self, opts: OptimizeOptions, rerun: Callable[[outputs.RerunFacts], dict]):
        self.opts = opts
        self.rerun = rerun
        self.n_trials = trial_budget(opts.mode, opts.trials)
        self.worker = worker_id()
        self.started = time.perf_counter()
        self._validate()

    # -- inputs (all checked before anything is written) -----------------------------------------
    def _validate(self) -> None:
        from ..measure.ppl import read_text

        o = self.opts
        if o.runtime.backend not in BACKENDS:
            raise BadSetting(Setting.BACKEND, f"must be one of {', '.join(BACKENDS)}, not {o.runtime.backend!r}")
        if o.chunks is None or o.chunks < 1:
            raise BadSetting(Setting.CHUNKS, f"must be at least 1, not {o.chunks}")
        if o.final_chunks is None or o.final_chunks < 0:
            raise BadSetting(Setting.FINAL_CHUNKS, f"must be 0 (off) or more, not {o.final_chunks}")
        if o.target_rank is not None and o.target_rank <= 0:
            raise BadSetting(Setting.THETA_RANK, f"must be positive, not {o.target_rank}")
        if o.max_kld is not None and not (np.isfinite(o.max_kld) and o.max_kld > 0):
            raise BadSetting(Setting.MAX_KLD, f"must be a positive number, not {o.max_kld}")
        if o.max_kld is not None and not o.reference:
            raise BadSetting(Setting.MAX_KLD, "needs", Setting.REFERENCE, "(KL-divergence is measured against it)")
        if o.max_overhead is not None and not np.isfinite(o.max_overhead):
            raise BadSetting(Setting.MAX_OVERHEAD, f"must be a number (percent), not {o.max_overhead}")
        for setting, path in ((Setting.IMATRIX, o.imatrix), (Setting.COVARIANCE, o.covariance)):
            if path and not o.reference:
                raise BadSetting(setting, "is used by a residual source, which needs", Setting.REFERENCE)
            if path and not Path(path).is_file():
                raise BadSetting(setting, f"file not found: {path}")
        if not o.study_name or not o.study_name.strip():
            raise BadSetting(Setting.STUDY_NAME, "must not be empty")
        check_ctx(o.runtime.ctx)

        # Where results go, and the storage, are checked before any model is read or loaded.
        out = Path(o.output_dir)
        check_output_dir(out, [o.model, o.reference, o.imatrix, o.text])
        self.storage_url = o.storage or default_storage_url(out)
        self.storage = open_storage(self.storage_url) if o.storage else None
        self._check_output_dir()

        self.model = ModelFile(o.model)
        if self.model.is_adapter:
            raise UserError(f"{o.model}: is an adapter, not a model")
        names = self.model.target_names()
        self.names = [n for n in names if group_of(n) is not None]
        groups = [g for g in GROUPS if any(group_of(n) == g for n in self.names)]
        if not groups:
            raise UserError(f"{o.model}: no attention or ffn weight matrices (blk.N.attn_q.weight, ...) to put theta on")
        self.reference = None
        if o.reference:
            from ..theta.convert import open_reference

            self.reference = open_reference(self.model, o.reference, self.names)
            if self.reference.is_adapter:
                raise UserError(f"{o.reference}: is an adapter, not a reference model")
            if self.reference.fingerprint == self.model.fingerprint:
                raise UserError(f"{o.reference}: is the model itself; the reference must be a higher-precision copy")
        self.space = SearchSpace.for_inputs(bool(o.reference), bool(o.imatrix), groups, o.target_rank,
                                            has_covariance=bool(o.covariance))
        self.notes = [] if o.reference else [search_space_note(self.space)]
        for name in self.names:
            if self.space.max_rank > min(self.model.shape(name)):
                if o.target_rank is not None:
                    theta_math.check_rank(o.target_rank, self.model.shape(name), name)
        self.factors = FactorCache(self.model, self.reference, self.names, self.space.max_rank, o.imatrix, o.quiet,
                                   covariance=o.covariance)
        for source in self.space.sources:  # a bad imatrix or covariance file fails now, not in trial 3
            if theta_math.source_info(source).statistics:
                self.factors.statistics(source)
        self.text = read_text(o.text)
        self.base_bytes = self.model.file_size
        self.scorer = TrialScorer(o, self.text, self.base_bytes)  # loads, tokenizes, counts chunks

    def setup(self) -> dict:
        """What must be equal for trials to be comparable (checked when a study is resumed)."""
        o = self.opts
        return {
            "model": self.model.identity().content(),
            "reference": self.reference.identity().content() if self.reference else None,
            "imatrix": file_digest(o.imatrix) if o.imatrix else None,
            "covariance": file_digest(o.covariance) if o.covariance else None,
            "text": {"name": Path(o.text).name, "sha256": file_digest(o.text)},
            "ctx": o.runtime.ctx, "chunks": o.chunks, "backend": o.runtime.backend,
            "flash_attn": bool(o.runtime.flash_attn),
            "max_kld": o.max_kld, "max_overhead": o.max_overhead,
        }

    def _check_output_dir(self) -> None:
        import json

        out = Path(self.opts.output_dir)
        summary = out / "optuna_study.json"
        if not summary.is_file():
            return
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
            other_name, other_storage = data["study_name"], data["storage"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{summary}: not an nkat optimize summary; choose another --output-dir") from None
        if other_name != self.opts.study_name or other_storage != redact(self.storage_url):
            raise UserError(
                f"--output-dir {out} holds the results of study {other_name!r} ({other_storage}); "
                f"choose another --output-dir, or resume it with --study-name {other_name}"
                + ("" if other_storage == redact(default_storage_url(out)) else f" --storage {other_storage}")
            )

    # -- the study ---------------------------------------------------------------------------------
    def _sampler(self):
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                n_startup_trials=min(10, max(3, self.n_trials // 3)), multivariate=True, group=True,
                constant_liar=True, seed=self.opts.seed,
            )

    def open_study(self):
        import json

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        name = self.opts.study_name
        storage = self.storage or open_storage(self.storage_url)
        self.storage = storage
        try:
            studies = {s.study_name: s for s in storage.get_all_studies()}
        except Exception as exc:
            raise UserError(f"--storage {redact(self.storage_url)}: cannot read studies ({scrub((str(exc) or type(exc).__name__).splitlines()[0], self.storage_url)})") from None
        if not self.opts.storage and studies and name not in studies:
            raise UserError(
                f"--output-dir {self.opts.output_dir} holds study {sorted(studies)[0]!r} in {DB_NAME}; "
                "choose another --output-dir or that --study-name"
            )
        space = json.loads(json.dumps(self.space.to_dict()))
        setup = json.loads(json.dumps(self.setup()))
        created = False
        if name not in studies:
            try:
                study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                            sampler=self._sampler())
                study.set_user_attr(ATTR_SPACE, space)
                study.set_user_attr(ATTR_SETUP, setup)
                study.set_user_attr("nkat_trials_target", self.n_trials)
                study.enqueue_trial(self.space.default_params(), user_attrs={"queued": "default recipe"})
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                pass  # another worker created it a moment ago
        if not created:
            study = optuna.load_study(study_name=name, storage=storage, sampler=self._sampler())
            self._check_existing(study, space, setup)
        self.study = study
        self.created = created
        return study

    def _check_existing(self, study, space: dict, setup: dict) -> None:
        import optuna

        name = self.opts.study_name
        deadline = time.monotonic() + 20
        attrs = study.user_attrs
        while (ATTR_SPACE not in attrs or ATTR_SETUP not in attrs) and time.monotonic() < deadline:
            time.sleep(0.5)  # its creator may still be writing them
            attrs = study.user_attrs
        if ATTR_SPACE not in attrs or ATTR_SETUP not in attrs:
            raise UserError(f"study {name!r} in {redact(self.storage_url)} was not made by nkat optimize; "
                            "choose another --study-name")
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise UserError(f"study {name!r} minimizes; nkat optimize maximizes TPE: choose another --study-name")
        if attrs[ATTR_SPACE] != space:
            diff = sorted(k for k in set(space) | set(attrs[ATTR_SPACE]) if space.get(k) != attrs[ATTR_SPACE].get(k))
            raise UserError(
                f"study {name!r} exists with a different search space ({', '.join(diff)}: "
                f"{attrs[ATTR_SPACE].get(diff[0])} there, {space.get(diff[0])} now); choose another --study-name"
            )
        if attrs[ATTR_SETUP] != setup:
            diff = sorted(k for k in set(setup) | set(attrs[ATTR_SETUP]) if setup.get(k) != attrs[ATTR_SETUP].get(k))
            raise UserError(
                f"study {name!r} was run with another {', '.join(diff)} ({attrs[ATTR_SETUP].get(diff[0])} there, "
                f"{setup.get(diff[0])} now): its trials are not comparable; choose another --study-name"
            )

    def _counts(self) -> dict:
        from optuna.trial import TrialState

        counts = {s: 0 for s in ("COMPLETE", "RUNNING", "WAITING", "FAIL", "PRUNED")}
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.PRUNED and t.user_attrs.get("surplus"):
                continue
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        return counts

    def _objective(self, trial) -> float:
        import optuna
        from optuna.trial import TrialState

        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("worker_trial", trial.number)
        trials = trial.study.get_trials(deepcopy=False)
        complete = sum(1 for t in trials if t.state == TrialState.COMPLETE)
        ahead = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < trial.number)
        if complete + ahead >= self.n_trials:
            # Another worker took the last slot a moment before us: this trial never runs.
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("the study's trial budget is taken by other workers")
        config = self.space.suggest(trial)
        trial.set_user_attr("config", config)
        started = time.perf_counter()
        try:
            figures = self.runner.evaluate(config)
        except NonFiniteError as exc:
            trial.set_user_attr("fail_reason", str(exc))
            return float("nan")  # Optuna fails this trial; the study goes on
        figures["trial_seconds"] = time.perf_counter() - started
        trial.set_user_attr("figures", figures)
        if self.opts.max_kld is not None:
            trial.set_constraint("kld", float(figures["kld_mean"]) - self.opts.max_kld)
        if self.opts.max_overhead is not None:
            trial.set_constraint("overhead", float(figures["overhead_pct"] or 0.0) - self.opts.max_overhead)
        return float(figures["tpe"])

    def run_trials(self, on_trial=None) -> int:
        """Run trials until the study holds n_trials COMPLETE ones (shared by all workers)."""
        import optuna

        ran = 0
        bar = progress(total=self.n_trials, desc="trials", quiet=self.opts.quiet, unit="trial")
        waited = False
        try:
            while True:
                fail_dead_local(self.study, self.storage, self.worker)
                counts = self._counts()
                bar.n = min(counts["COMPLETE"], self.n_trials)
                bar.refresh()
                if counts["COMPLETE"] >= self.n_trials:
                    break
                if counts["COMPLETE"] + counts["RUNNING"] >= self.n_trials:
                    if not waited:
                        say(f"waiting for {counts['RUNNING']} running trial(s) of other workers", self.opts.quiet)
                        waited = True
                    time.sleep(WAIT_POLL)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        optuna.storages.fail_stale_trials(self.study)
                    continue
                with warnings.catch_warnings(), quiet_interrupted_trial():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self.study.optimize(self._objective, n_trials=1, gc_after_trial=False)
                ran += 1
                best = max((t.value for t in self.study.get_trials(deepcopy=False)
                            if t.value is not None), default=None)
                if best is not None:
                    bar.set_postfix_str(f"best TPE {best:.5f} (baseline {self.scorer.baseline['tpe']:.5f})")
                if on_trial:
                    on_trial()
        finally:
            bar.close()
        return ran

    # -- the whole job -------------------------------------------------------------------------------
    def run(self) -> dict:
        o = self.opts
        out = Path(o.output_dir)
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(out)
        try:
            self.open_study()
        except BaseException:
            if made and not any(out.iterdir()):
                out.rmdir()
            raise
        for note in self.notes:
            print(f"nkat optimize: note: {note}", file=sys.stderr)
        say(f"study {o.study_name!r} in {redact(self.storage_url)}: "
            f"{'new' if self.created else 'resumed'}, {self._counts()['COMPLETE']}/{self.n_trials} trials complete",
            o.quiet)
        self.runner = TrialRunner(o, self.factors, self.scorer)
        try:
            self.scorer.prepare(self.runner.scratch / "reference-logprobs")
            writer = outputs.OutputWriter(self.report())
            ran = self.run_trials(on_trial=writer.write_progress)
        finally:
            self.runner.close()
        return writer.finish(ran)

    def report(self) -> outputs.OptimizeReport:
        """What the outputs need of this worker, once the reference and baseline are scored."""
        return outputs.OptimizeReport(
            opts=self.opts, study=self.study, n_trials=self.n_trials, storage_url=self.storage_url,
            worker=self.worker, started=self.started, base_bytes=self.base_bytes, baseline=self.scorer.baseline,
            reference=self.scorer.reference,
            reference_bytes=self.reference.file_size if self.reference is not None else None,
            available_chunks=self.scorer.available_chunks, max_rank=self.space.max_rank,
            search_space=self.space.to_dict(), setup=self.setup(), notes=self.notes,
            svd_seconds=self.factors.seconds, write_theta=self.factors.write, budget_of=self.factors.budget_of,
            final_evaluation=self.final_evaluation, rerun=self.rerun,
        )

    # -- used by the outputs ---------------------------------------------------------------------
    def final_evaluation(self, nkat_path: Path) -> dict | None:
        """Best theta, baseline (same model at gamma 0) and reference on --final-chunks chunks."""
        o = self.opts
        if not o.final_chunks:
            return None
        n = min(o.final_chunks, self.scorer.available_chunks)
        rt = Runtime.from_settings(o.model, nkat_path, o.runtime)
        ref = Runtime.from_settings(o.reference, None, o.runtime) if o.reference else None
        given = Runtime.from_settings(o.model, o.given_theta, o.runtime) if o.given_theta else None
        candidates = {"baseline": (rt, 0.0), "best": (rt, rt.file_gamma)} | ({"given": given} if given else {})
        try:
            results = evaluate(candidates, self.scorer.tokens, o.runtime.ctx, n, reference=ref, quiet=o.quiet)
        finally:
            for runtime in (rt, ref, given):
                if runtime is not None:
                    runtime.close()
        base_ppl = results["baseline"]["ppl"]
        ref_ppl = results["reference"]["ppl"] if "reference" in results else None
        figures = ("ppl", "ppl_err", "kld_mean", "kld_p99", "top1_agreement")
        out = {"chunks": n, "ctx": o.runtime.ctx}
        out["best"] = score_row(pick(results["best"], figures), self.base_bytes, rt.theta_meta.theta_bytes,
                                base_ppl=base_ppl, reference_ppl=ref_ppl)
        out["baseline"] = score_row(pick(results["baseline"], figures), self.base_bytes)
        if ref_ppl is not None:
            out["reference"] = pick(results["reference"], ("ppl", "ppl_err"))
        if given is not None:
            out["given"] = score_row(pick(results["given"], figures[:4]), self.base_bytes,
                                     given.theta_meta.theta_bytes) | {"theta": str(o.given_theta)}
        out["beats_baseline"] = out["best"]["tpe"] > out["baseline"]["tpe"]
        out["wall_seconds"] = results["_wall_seconds"]
        return out


def run_optimize(opts: OptimizeOptions, rerun: Callable[[outputs.RerunFacts], dict]) -> dict:
    """Run one worker of the study; `rerun` words the commands that redo its best trial."""
    return Optimizer(opts, rerun).run()
