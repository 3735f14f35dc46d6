"""The files nkat optimize leaves in its output dir (the seed's names).

  optimization_history.json   every trial: parameters, PPL, KLD, TPE, bytes, state, feasibility
  optuna_study.json           study summary: baseline, best trial, verdict, search space, setup
  optimization_results.png    optuna's matplotlib plots: history, parameter importances, slices
  optimal_rank{R}_gamma{G}.nkat / .json
                              the best trial's theta and its figures, only when it beats the
                              baseline's TPE on the study's chunks AND on the final, longer
                              evaluation (an "optimal" theta that loses is never claimed)
"""

from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..formats.keys import NkatKeys
from ..formats.nkat_format import read_meta
from ..measure.byte_control import byte_matched, charged_tpe
from ..util.atomic import atomic_path, write_text_atomic
from ..util.report import say, to_json
from .options import OptimizeOptions
from ..util.study_storage import redact

HISTORY = "optimization_history.json"
SUMMARY = "optuna_study.json"
PLOT = "optimization_results.png"
FIGURE_KEYS = ("chunks", "ppl", "ppl_err", "kld_mean", "kld_p99", "top1_agreement", "tpe", "bytes", "theta_bytes", "rho",
               "gap_recovered", "overhead_pct", "overhead_measure", "decode_overhead_pct", "decode_seconds", "trial_seconds", "tensors", "no_theta")


def trial_row(t) -> dict:
    """One history row from a FrozenTrial."""
    figures = t.user_attrs.get("figures") or {}
    constraints = dict(t.constraints)
    duration = t.duration.total_seconds() if t.duration is not None else None
    row = {
        "number": t.number,
        "state": t.state.name,
        "params": t.user_attrs.get("config"),
        "optuna_params": dict(t.params),
    }
    row.update({k: figures.get(k) for k in FIGURE_KEYS})
    row["feasible"] = all(v <= 0 for v in constraints.values()) if t.state.name == "COMPLETE" else None
    row["constraints"] = constraints
    row["duration_seconds"] = duration
    row["worker"] = t.user_attrs.get("worker")
    if "failed_trial" in t.system_attrs:
        row["retry_of"] = t.system_attrs["failed_trial"]
    if t.state.name == "FAIL" and t.user_attrs.get("fail_reason"):
        row["fail_reason"] = t.user_attrs["fail_reason"]
    return row


def history_rows(study) -> list[dict]:
    """Every trial except the never-run surplus ones (a budget race between workers)."""
    return [trial_row(t) for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]


def select_best(rows: list[dict]) -> dict | None:
    """The feasible COMPLETE trial with theta and the highest TPE (earliest on ties)."""
    candidates = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"] and not r["no_theta"]
                  and r["tpe"] is not None]
    return max(candidates, key=lambda r: (r["tpe"], -r["number"]), default=None)


def best_stem(row: dict) -> str:
    return f"optimal_rank{row['params']['rank']}_gamma{row['params']['gamma']:.2f}"


@dataclass
class OptimizeReport:
    """Everything the outputs are written from: one worker's settings, its study and the figures
    fixed before the trials (the optimizer fills it; the outputs never see the optimizer)."""

    opts: OptimizeOptions
    study: Any  # the optuna Study: its trials are read at every write
    n_trials: int
    storage_url: str
    worker: str
    started: float  # time.perf_counter() when the worker started
    base_bytes: int
    baseline: dict  # the baseline's figures on the study's chunks (evaluator result + tpe)
    reference: dict | None  # the reference's figures there
    reference_bytes: int | None
    available_chunks: int
    max_rank: int  # the rank the study's SVDs were taken at
    search_space: dict
    setup: dict
    notes: list[str]
    svd_seconds: dict  # the factor cache's own dict: filled while trials run
    write_theta: Callable[..., int]  # FactorCache.write(path, config, gamma, extra) -> theta bytes
    budget_of: Callable[[dict], int | None]  # a configuration's byte budget (None: uniform ranks)
    final_evaluation: Callable[[Path], dict | None]  # the best theta on --final-chunks
    rerun: Callable[[RerunFacts], dict]  # the commands that redo the best trial (the CLI words them)


@dataclass(frozen=True)
class RerunFacts:
    """What the commands that redo a study's best trial are made of."""

    opts: OptimizeOptions
    row: dict  # the trial's history row (params, figures)
    nkat_path: Path  # where its theta was written
    budget_bytes: int | None  # the file budget of its ranks, for a budget allocation
    max_rank: int  # the rank the study's SVDs were taken at
    n_trials: int  # the study's trial budget


class OutputWriter:
    """Writes the outputs of one worker's view of the study (atomically, one file at a time)."""

    def __init__(self, report: OptimizeReport):
        self.report = report
        self.out = Path(report.opts.output_dir)

    # -- pieces -------------------------------------------------------------------------------------
    def baseline(self) -> dict:
        b = self.report.baseline
        return {"ppl": b["ppl"], "ppl_err": b["ppl_err"], "kld_mean": b.get("kld_mean"), "tpe": b["tpe"],
                "bytes": self.report.base_bytes, "chunks": b["chunks"], "decode_seconds": b["decode_seconds"]}

    def control(self, best_bytes: int | None) -> dict | None:
        """The reference as byte-matched control: the next quant type at about the same bytes."""
        ref = self.report.reference
        if ref is None:
            return None
        ref_bytes = self.report.reference_bytes
        out = {"label": f"{Path(self.report.opts.reference).name} (reference)", "ppl": ref["ppl"],
               "ppl_err": ref["ppl_err"], "bytes": ref_bytes,
               "tpe": charged_tpe(ref["ppl"], ref_bytes, self.report.base_bytes), "chunks": ref["chunks"],
               "note": "TPE charges the reference's bytes beyond the base model like theta bytes (byte_control rule)"}
        if best_bytes:
            out["byte_matched"] = byte_matched(ref_bytes, best_bytes)
            out["bytes_vs_best"] = ref_bytes / best_bytes
        return out

    def summary(self, rows: list[dict], best: dict | None, final: dict | None, files: list[str],
                status: str) -> dict:
        opt = self.report
        base = self.baseline()
        counts = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        done = [r for r in rows if r["state"] == "COMPLETE" and not r["no_theta"] and r["trial_seconds"]]
        beats = best is not None and best["tpe"] > base["tpe"] and (final is None or final["beats_baseline"])
        return {
            "study_name": opt.opts.study_name,
            "storage": redact(opt.storage_url),
            "status": status,
            "direction": "maximize",
            "objective": "TPE = (1/PPL) / log10(1 + 9 (1 + theta bytes / base bytes)) on the study's chunks",
            "trials_target": opt.n_trials,
            "trials": counts,
            "seconds_per_trial": (sum(r["trial_seconds"] for r in done) / len(done)) if done else None,
            "baseline": base,
            "reference": opt.reference and {"ppl": opt.reference["ppl"], "ppl_err": opt.reference["ppl_err"],
                                            "bytes": opt.reference_bytes},
            "control": self.control(best["bytes"] if best else None),
            "best_trial": best,
            "beats_baseline": beats,
            "verdict": verdict(best, base, final, opt.opts.max_kld, opt.opts.max_overhead,
                               self.control(best["bytes"] if best else None), opt.opts.final_chunks),
            "final": final,
            "files": files,
            "notes": opt.notes,
            "search_space": opt.search_space,
            "setup": opt.setup,
            "overhead_measure": ("generation: bench.measure_overhead per adapter (--max-overhead)"
                                 if opt.opts.max_overhead is not None else
                                 "decode: time of the study's chunks vs the baseline's (prompt processing)"),
            "svd_seconds": dict(opt.svd_seconds),
            "worker": opt.worker,
            "wall_seconds": time.perf_counter() - opt.started,
        }

    # -- writing -------------------------------------------------------------------------------------
    def write_progress(self) -> None:
        """After each trial: the history and a summary marked running (cheap; no plot)."""
        rows = history_rows(self.report.study)
        write_text_atomic(self.out / HISTORY, to_json(rows) + "\n")
        previous = self._previous_files()
        summary = self.summary(rows, select_best(rows), None, previous, "running")
        write_text_atomic(self.out / SUMMARY, to_json(summary) + "\n")

    def _previous_summary(self) -> dict:
        try:
            data = json.loads((self.out / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _previous_files(self) -> list[str]:
        return list(self._previous_summary().get("files") or [])

    def _is_written(self, path: Path, best: dict) -> bool:
        """The .nkat at `path` is this study's file for this trial (nothing to redo)."""
        if not path.is_file():
            return False
        try:
            meta = read_meta(path)
        except UserError:
            return False
        return (meta.extra.get(NkatKeys.Extra.OPTIMIZE_STUDY) == self.report.opts.study_name
                and str(meta.extra.get(NkatKeys.Extra.OPTIMIZE_TRIAL)) == str(best["number"])
                and meta.theta_bytes == best["theta_bytes"])

    def _confirm_and_write(self, best: dict, base: dict) -> tuple[dict | None, list[str]]:
        """Re-evaluate the best trial on --final-chunks; write optimal_* only when that confirms
        the win (or when the final evaluation is off). Returns (final evaluation, files written)."""
        opt = self.report
        quiet = opt.opts.quiet
        stem = best_stem(best)
        nkat_path = self.out / f"{stem}.nkat"
        previous = self._previous_summary()
        same_best = (previous.get("best_trial") or {}).get("number") == best["number"]
        old_final = previous.get("final") if same_best else None
        wanted = min(opt.opts.final_chunks, opt.available_chunks)
        reuse = bool(old_final and old_final.get("chunks") == wanted and old_final.get("ctx") == opt.opts.runtime.ctx)
        if same_best and self._is_written(nkat_path, best):
            say(f"the best theta (trial {best['number']}) is already in {nkat_path}", quiet)
            final = old_final if reuse else opt.final_evaluation(nkat_path)
            candidate = nkat_path
        else:
            candidate = self.out / f".{stem}.unconfirmed.nkat"  # renamed only once the final run confirms it
            opt.write_theta(candidate, best["params"], best["params"]["gamma"],
                              extra={NkatKeys.Extra.OPTIMIZE_STUDY: opt.opts.study_name,
                                     NkatKeys.Extra.OPTIMIZE_TRIAL: best["number"]})
            try:
                final = old_final if reuse else opt.final_evaluation(candidate)
            except BaseException:
                candidate.unlink(missing_ok=True)
                raise
        if final is not None and not final["beats_baseline"]:
            candidate.unlink(missing_ok=True)
            return final, []
        if candidate != nkat_path:
            say(f"writing the best theta (trial {best['number']}) to {nkat_path}", quiet)
            candidate.replace(nkat_path)
        best_doc = dict(best)
        best_doc.update({
            "trial": best["number"],
            "baseline": {"ppl": base["ppl"], "tpe": base["tpe"], "kld_mean": base["kld_mean"],
                         "bytes": base["bytes"], "chunks": base["chunks"]},
            "control": self.control(best["bytes"]),
            "final": final,
            "nkat": nkat_path.name,
            "study_name": opt.opts.study_name,
            "verdict": verdict(best, base, final, opt.opts.max_kld, opt.opts.max_overhead,
                               self.control(best["bytes"])),
        })
        best_doc.update(opt.rerun(RerunFacts(opt.opts, best, nkat_path, opt.budget_of(best["params"]),
                                             opt.max_rank, opt.n_trials)))
        write_text_atomic(self.out / f"{stem}.json", to_json(best_doc) + "\n")
        return final, [nkat_path.name, f"{stem}.json"]

    def finish(self, ran: int) -> dict:
        opt = self.report
        rows = history_rows(opt.study)
        best = select_best(rows)
        base = self.baseline()
        files: list[str] = []
        final = None
        stale = set(self._previous_files())
        if best is not None and best["tpe"] > base["tpe"]:
            final, files = self._confirm_and_write(best, base)
        for name in stale - set(files):
            if name.startswith("optimal_") and (self.out / name).is_file():
                (self.out / name).unlink()  # an earlier best of this same study
        plot = write_plot(opt.study, self.out / PLOT)
        write_text_atomic(self.out / HISTORY, to_json(rows) + "\n")
        summary = self.summary(rows, best, final, files, "finished")
        mine = [t for t in opt.study.get_trials(deepcopy=False)
                if t.state.name == "COMPLETE" and t.user_attrs.get("worker") == opt.worker
                and t.user_attrs.get("worker_trial") == t.number]
        summary["trials_completed_by_this_worker"] = len(mine)
        summary["plot"] = plot
        write_text_atomic(self.out / SUMMARY, to_json(summary) + "\n")
        summary["output_dir"] = str(self.out)
        return summary


def verdict(best: dict | None, base: dict, final: dict | None, max_kld, max_overhead, control=None,
            final_chunks: int = 0) -> str:
    bars = []
    if max_kld is not None:
        bars.append(f"KLD <= {max_kld:g}")
    if max_overhead is not None:
        bars.append(f"overhead <= {max_overhead:g} %")
    if best is None:
        return ("no feasible trial with theta completed" + (f" ({', '.join(bars)})" if bars else "")
                + ": nothing to recommend over the baseline")
    if best["tpe"] <= base["tpe"]:
        return (f"nothing beat the baseline: best TPE {best['tpe']:.5f} (trial {best['number']}, PPL "
                f"{best['ppl']:.3f}) <= baseline TPE {base['tpe']:.5f} (PPL {base['ppl']:.3f}); "
                "no optimal theta written")
    text = (f"trial {best['number']} beats the baseline on {best['chunks']} chunks: TPE {best['tpe']:.5f} vs "
            f"{base['tpe']:.5f} (PPL {best['ppl']:.3f} vs {base['ppl']:.3f})")
    if final:
        b, f = final["best"], final["baseline"]
        if not final["beats_baseline"]:
            return (f"nothing beat the baseline: trial {best['number']} led on {best['chunks']} chunks (TPE "
                    f"{best['tpe']:.5f} vs {base['tpe']:.5f}) but NOT on the final {final['chunks']} chunks: TPE "
                    f"{b['tpe']:.5f} vs {f['tpe']:.5f} (PPL {b['ppl']:.3f} vs {f['ppl']:.3f}); no optimal theta written")
        text += f"; confirmed on {final['chunks']} chunks: TPE {b['tpe']:.5f} vs {f['tpe']:.5f} (PPL {b['ppl']:.3f} vs {f['ppl']:.3f})"
    elif final_chunks:
        text += f"; to be confirmed on {final_chunks} chunks when the study finishes"
    else:
        text += "; not re-evaluated on more chunks (--final-chunks 0)"
    if control and control.get("byte_matched") and control["tpe"] > best["tpe"]:
        text += (f". The byte-matched control {control['label']} scores higher still (TPE {control['tpe']:.5f}, "
                 f"PPL {control['ppl']:.3f} at {control['bytes_vs_best']:.2f}x the bytes): at this size the "
                 "next quant type is the better buy")
    return text


def write_plot(study, path: Path) -> str | None:
    """History, parameter importances and slices (optuna.visualization.matplotlib) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    images = []
    makers = [("optimization history", lambda: ovm.plot_optimization_history(study, target_name="TPE")),
              ("parameter importances", lambda: ovm.plot_param_importances(study, target_name="TPE")),
              ("slices", lambda: ovm.plot_slice(study, target_name="TPE"))]
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for title, make in makers:
            try:
                ax = make()
            except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
                notes.append(f"{title}: not drawn ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
                continue
            first = ax.flat[0] if hasattr(ax, "flat") else ax
            fig = first.figure
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
            plt.close(fig)
            buf.seek(0)
            images.append(mpimg.imread(buf))
    if not images:
        return None
    # Rows: history and importances side by side, then the slices across the full width.
    rows = [images[:2], images[2:]] if len(images) > 2 else [images]
    width = max(sum(img.shape[1] for img in row) for row in rows)
    heights = [max(img.shape[0] for img in row) for row in rows]
    note_h = 30 * len(notes)
    total = sum(heights) + note_h
    fig = plt.figure(figsize=(width / 90, total / 90), dpi=90)
    top = 1.0
    for row, row_h in zip(rows, heights):
        left = 0.0
        for img in row:
            ax = fig.add_axes([left, top - img.shape[0] / total, img.shape[1] / width, img.shape[0] / total])
            ax.imshow(img)
            ax.axis("off")
            left += img.shape[1] / width
        top -= row_h / total
    for i, note in enumerate(notes):
        fig.text(0.01, top - (i + 0.5) * 30 / total, note, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path.name
