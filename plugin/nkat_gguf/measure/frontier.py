"""The quality-per-byte frontier: the quant ladder (k- and i-quants), nkat mix's files and theta
points, all scored against one reference on the same chunks.

Steps (each cached in the work directory, so an interrupted run resumes where it stopped):
1. activation statistics of the reference on the calibration text (an imatrix);
2. the ladder: llama.cpp quantizations of the reference, importance-weighted with that imatrix;
3. theta points: for each base on the ladder, theta (nkat convert --optimize-rank) at each budget,
   all budgets of a base cut from one set of SVDs;
4. nkat mix (recipe/, with its fit) at the bytes of every rung, and at each theta point's bytes
   (the point's byte-matched control): per-tensor llama.cpp types written by llama.cpp's quantizer;
5. the reference decoded once, its log-probs stored on disk; then every model scored one at a
   time against them (PPL ± error, KLD mean/p99, top-1), results cached per file fingerprint and
   settings;
6. rows, the Pareto frontier (bytes vs KLD, and bytes vs PPL) and one verdict per theta point.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from .byte_control import BYTE_TOLERANCE, control_verdict, verdict_line
from ..errors import UserError
from ..recipe.fit import DEFAULT_CHUNKS as DEFAULT_FIT_CHUNKS
from ..recipe.layout import tensor_types
from ..util.report import say
from .scoring import RowKind, ScoredRow, pareto, score_rows, settings_record
from ..runtime.settings import RuntimeSettings

DEFAULT_LADDER = ("IQ2_XXS", "IQ2_XS", "IQ2_M", "Q2_K", "IQ3_XXS", "Q3_K_S", "IQ3_S", "IQ3_M", "Q3_K_M", "IQ4_XS",
                  "Q4_0")
# Theta below 2.5 bits per weight too: the published equal-byte wins of low-rank compensation
# (CALDERA, LQ-LoRA) are all there.
DEFAULT_BASES = ("IQ2_XXS", "IQ2_XS", "Q2_K", "Q3_K_S")
DEFAULT_BUDGETS = ("2%", "5%", "next")
NEXT = "next"
# A "next" budget stops this far below the next rung's bytes (the .nkat header is not in the budget).
NEXT_MARGIN = 0.002
MiB = 1024 * 1024


@dataclass
class FrontierOptions:
    reference: str
    text: str
    work_dir: str
    calib_text: str | None = None
    imatrix: str | None = None  # given: use it; else calibrate the reference
    covariance: str | None = None  # for --source residual-cov: given, or collected from the reference
    max_memory: int = 8 << 30  # covariance sums held at once while collecting them
    calib_chunks: int = 8
    quant_dir: str | None = None  # where ladder files go (default: work_dir)
    name: str | None = None  # file prefix (default: the reference's stem)
    ladder: list[str] = field(default_factory=lambda: list(DEFAULT_LADDER))
    ladder_imatrix: bool = True
    bases: list[str] = field(default_factory=lambda: list(DEFAULT_BASES))
    budgets: list[str] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    source: str = "residual-act"
    theta_rank: int = 32
    controls: bool = True  # nkat mix at each theta point's bytes
    mixes: bool = True  # nkat mix at each ladder rung's bytes
    fit_chunks: int = DEFAULT_FIT_CHUNKS  # calibration chunks per probe of nkat mix's fit (0: no fit)
    chunks: int = 8
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    quiet: bool = False


def parse_budget(text: str) -> str:
    """'5%' / '5' (percent of the base's bytes) or 'next' (up to the next larger rung)."""
    value = text.strip().lower()
    if value == NEXT:
        return NEXT
    try:
        pct = float(value.rstrip("%"))
    except ValueError:
        raise UserError(f"budget {text!r}: expected a percentage like 5% or the word next") from None
    if not 0 < pct <= 100:
        raise UserError(f"budget {text!r}: the percentage must be in (0, 100]")
    return f"{pct:g}%"


class Frontier:
    def __init__(self, opts: FrontierOptions):
        self.o = opts
        self.work = Path(opts.work_dir)
        self.quant_dir = Path(opts.quant_dir) if opts.quant_dir else self.work
        self.name = opts.name or Path(opts.reference).stem
        self.timings: dict[str, float] = {}

    def check_types(self) -> None:
        import llama_cpp

        from ..recipe.candidates import FTYPES_NEEDING_IMATRIX
        from ..runtime.quantize import ftype_names

        known = ftype_names(llama_cpp)
        for qtype in self.o.ladder:
            if qtype.lower() not in known:
                raise UserError(f"--ladder {qtype!r} is not a llama.cpp quant type; one of: {', '.join(sorted(known))}")
        ladder = {t.upper() for t in self.o.ladder}
        refused = sorted(ladder & FTYPES_NEEDING_IMATRIX)
        if refused and not self.o.ladder_imatrix:
            raise UserError(f"--no-ladder-imatrix: llama.cpp quantizes {', '.join(refused)} only with an imatrix; "
                            "give a --ladder without them")
        for base in self.o.bases:
            if base.upper() not in ladder:
                raise UserError(f"--bases {base!r} is not on the --ladder ({', '.join(sorted(ladder))})")

    # -- 1. statistics -----------------------------------------------------------------------
    def imatrix(self) -> str:
        if self.o.imatrix:
            return self.o.imatrix
        from ..runtime.calibrate import calibrate
        from ..formats.defaults import find_calibration_text
        from .ppl import read_text

        rs = self.o.runtime
        path = self.work / f"{self.name}-calib{self.o.calib_chunks}x{rs.ctx}.imatrix"
        if path.is_file():
            return str(path)
        text = find_calibration_text(self.o.calib_text)
        say(f"[frontier] activation statistics of {Path(self.o.reference).name} on {text.name}", self.o.quiet)
        calibrate(self.o.reference, read_text(text), str(text), path, self.o.calib_chunks, rs, self.o.quiet)
        return str(path)

    def covariance(self) -> str | None:
        """The reference's input covariances, for a source that whitens with them (else None)."""
        from ..theta.lowrank import StatisticsKind, source_info

        if source_info(self.o.source).statistics != StatisticsKind.COVARIANCE:
            return None
        if self.o.covariance:
            return self.o.covariance
        from ..formats.defaults import find_calibration_text
        from ..runtime.calibrate import calibrate
        from .ppl import read_text

        rs = self.o.runtime
        path = self.work / f"{self.name}-calib{self.o.calib_chunks}x{rs.ctx}.cov"
        if not path.is_file():
            text = find_calibration_text(self.o.calib_text)
            say(f"[frontier] input covariances of {Path(self.o.reference).name} on {text.name}", self.o.quiet)
            t0 = time.perf_counter()
            calibrate(self.o.reference, read_text(text), str(text), path, self.o.calib_chunks, rs, self.o.quiet,
                      covariance=True, max_memory=self.o.max_memory)
            self.timings["covariance"] = time.perf_counter() - t0
        return str(path)

    # -- 2. ladder ---------------------------------------------------------------------------
    def ladder(self, imatrix: str) -> list[ScoredRow]:
        from ..runtime.quantize import quantize_model

        rows = []
        for qtype in self.o.ladder:
            suffix = "-imat" if self.o.ladder_imatrix else ""
            path = self.quant_dir / f"{self.name}-{qtype.upper()}{suffix}.gguf"
            if not path.is_file():
                say(f"[frontier] quantizing to {qtype} -> {path}", self.o.quiet)
                t0 = time.perf_counter()
                quantize_model(self.o.reference, str(path), qtype, self.o.runtime.threads,
                               imatrix=imatrix if self.o.ladder_imatrix else None)
                self.timings[f"quantize {qtype}"] = time.perf_counter() - t0
            rows.append(ScoredRow(qtype.upper() + suffix, RowKind.LADDER, str(path), facts={"type": qtype.upper()}))
        rows.append(ScoredRow(f"{Path(self.o.reference).name} (reference)", RowKind.REFERENCE, self.o.reference,
                              facts={"type": "reference"}))
        return rows

    # -- 3. theta points ---------------------------------------------------------------------
    def theta_budget_mb(self, budget: str, base_bytes: int, ladder: list[ScoredRow]) -> float | None:
        if budget != NEXT:
            return float(budget.rstrip("%")) / 100 * base_bytes / MiB
        bigger = sorted(r.model_bytes for r in ladder if r.model_bytes > base_bytes * 1.005)
        if not bigger:
            return None
        return (bigger[0] * (1 - NEXT_MARGIN) - base_bytes) / MiB

    def theta_points(self, ladder: list[ScoredRow], imatrix: str, covariance: str | None) -> list[ScoredRow]:
        from ..theta.convert import ConvertOptions, convert_budgets

        by_type = {r.facts["type"]: r for r in ladder}
        points = []
        for base_type in (b.upper() for b in self.o.bases):
            if base_type not in by_type:
                raise UserError(f"--bases {base_type}: not on the ladder ({', '.join(by_type)})")
            base = by_type[base_type]
            base_bytes = base.model_bytes
            todo, mine = [], []
            for budget in self.o.budgets:
                mb = self.theta_budget_mb(budget, base_bytes, ladder)
                if mb is None or mb <= 0:
                    say(f"[frontier] {base_type}: no larger rung for budget {budget}, skipped", self.o.quiet)
                    continue
                tag = "next" if budget == NEXT else budget.rstrip("%") + "pct"
                out = self.work / f"{self.name}-{base.label}-theta-{self.o.source}-{tag}.nkat"
                mine.append(ScoredRow(
                    f"{base.label} + theta {budget}" + (f" ({mb:.0f} MiB)" if budget == NEXT else ""), RowKind.THETA,
                    base.model, str(out),
                    facts={"type": base_type, "base": base.label, "budget": budget, "budget_mb": mb}))
                if not out.is_file():
                    todo.append((str(out), int(mb * MiB)))
            if todo:
                say(f"[frontier] theta for {base.label}: {len(todo)} budget(s)", self.o.quiet)
                t0 = time.perf_counter()
                convert_budgets(base.model, todo, ConvertOptions(
                    rank=self.o.theta_rank, source=self.o.source, reference=self.o.reference,
                    imatrix=imatrix if self.o.source == "residual-act" else None, covariance=covariance,
                    quiet=self.o.quiet))
                self.timings[f"theta {base_type}"] = time.perf_counter() - t0
            points += mine
        return points

    # -- 4. nkat mix: at each rung's bytes, and at each theta point's (its control) -------------
    def mixes(self, ladder: list[ScoredRow], points: list[ScoredRow], imatrix: str) -> tuple[list, list]:
        """nkat mix's files (per-tensor llama.cpp types with the same imatrix, its role x depth fit on
        the calibration text, written by llama.cpp's quantizer) at the bytes of every ladder rung
        (rows of kind mix) and of every theta point (its byte-matched control): (mixes, controls)."""
        from ..recipe.mix import MixOptions, run_mix

        o = self.o
        rungs = [r for r in ladder if r.kind == RowKind.LADDER] if o.mixes else []
        points = points if o.controls else []
        budget = {id(r): f"{r.bytes / MiB!r}MiB" for r in rungs + points}  # exact bytes, as MiB
        if not budget:
            return [], []
        work = self.work / "mix"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        made = run_mix(MixOptions(
            reference=o.reference, output=str(work / "frontier-mix.gguf"), work_dir=str(work),
            budgets=list(dict.fromkeys(budget.values())), imatrix=imatrix, calib_text=o.calib_text,
            fit_chunks=o.fit_chunks, runtime=o.runtime, quiet=o.quiet, skip_impossible=True))
        self.timings["mixes"] = time.perf_counter() - t0
        by_budget = {m["budget"]: m for m in made["mixes"]}
        mixes, controls = [], []
        for rung in rungs:
            if (m := by_budget.get(budget[id(rung)])) is None:
                say(f"[frontier] {rung.label}: no mix of the reference fits its bytes", o.quiet)
                continue
            mixes.append(ScoredRow(f"mix at {rung.label}", RowKind.MIX, m["model"],
                                   facts={"type": "mix", "at": rung.label}))
        base_types = {p.model: tensor_types(p.model) for p in points}  # each base read once
        for point in points:
            if (m := by_budget.get(budget[id(point)])) is None:
                say(f"[frontier] {point.label}: no mix of the reference fits its bytes, no control", o.quiet)
                continue
            f = point.facts
            controls.append(ScoredRow(f"{f['base']} mixed {f['budget']}", RowKind.CONTROL, m["model"], facts={
                "type": f["type"], "base": f["base"], "for": point.label,
                "upgraded": sum(base_types[point.model].get(t["name"]) != t["type"] for t in m["tensors"])}))
        return mixes, controls

    # -- 6. verdicts -------------------------------------------------------------------------
    @staticmethod
    def finish_rows(rows: list[ScoredRow]) -> None:
        """Each row's bytes and whether it is on the Pareto front (bytes vs KLD, bytes vs PPL)."""
        for r in rows:
            r.facts.update(model_bytes=r.model_bytes, theta_bytes=r.theta_bytes, bytes=r.bytes)
        for metric in ("kld_mean", "ppl"):
            front = pareto(rows, metric)
            for r in rows:
                r.facts[f"pareto_{metric.split('_')[0]}"] = r.label in front

    def run(self) -> dict:
        started = time.perf_counter()
        self.work.mkdir(parents=True, exist_ok=True)
        self.quant_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.o.reference, self.o.text):
            if not Path(path).is_file():
                raise UserError(f"file not found: {path}")
        self.check_types()
        imatrix = self.imatrix()
        ladder = self.ladder(imatrix)
        points = self.theta_points(ladder, imatrix, self.covariance())
        mixes, controls = self.mixes(ladder, points, imatrix)
        # Scored in order of interest (each result is cached as it completes): the ladder and its
        # mixes, then each theta point beside its control, the largest budget first.
        paired = []
        for p in sorted(points, key=lambda p: -p.facts["budget_mb"]):
            paired += [p] + [c for c in controls if c.facts["for"] == p.label]
        rows = ladder + mixes + paired
        t0 = time.perf_counter()
        o = self.o
        self.n_chunks, self.runtime_settings = score_rows(
            rows, reference=o.reference, text=o.text, work=self.work, runtime=o.runtime, chunks=o.chunks,
            quiet=o.quiet)
        self.timings["scoring"] = time.perf_counter() - t0
        self.finish_rows(rows)
        plain = [r.to_dict() for r in rows if r.kind != RowKind.THETA]
        verdicts = []
        for p in (r for r in rows if r.kind == RowKind.THETA):
            control = control_verdict(p.to_dict(), plain)
            own = next((c for c in controls if c.facts["for"] == p.label), None)
            p.facts.update(control=control.to_dict() if control else None, own_control=own.label if own else None,
                           verdict=verdict_line(p.label, control))
            verdicts.append(p.facts["verdict"])
        rows.sort(key=lambda r: r.bytes)
        return {
            "rows": [r.to_dict() for r in rows],
            "verdicts": verdicts,
            "goals": goals(rows),
            "settings": {**settings_record(self.o), "imatrix": imatrix, "chunks_scored": self.n_chunks,
                         "byte_tolerance": BYTE_TOLERANCE, **self.runtime_settings},
            "timings": self.timings,
            "wall_seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def goals(rows: list[ScoredRow]) -> list[dict]:
    """Each base + theta at <= the bytes of the next rung vs that rung, on PPL and KLD."""
    ladder = sorted((r for r in rows if r.kind in (RowKind.LADDER, RowKind.REFERENCE)), key=lambda r: r.bytes)
    out = []
    for p in (r for r in rows if r.kind == RowKind.THETA):
        rung = next((r for r in ladder if r.bytes > p.model_bytes * 1.005), None)
        if rung is None or not p.bytes <= rung.bytes:
            continue
        out.append({"point": p.label, "rung": rung.label, "bytes": p.bytes, "rung_bytes": rung.bytes,
                    "ppl": p.ppl, "ppl_err": p.figures["ppl_err"], "rung_ppl": rung.ppl,
                    "rung_ppl_err": rung.figures["ppl_err"], "kld_mean": p.kld_mean, "rung_kld_mean": rung.kld_mean,
                    "beats_on_ppl": p.ppl < rung.ppl, "beats_on_kld": p.kld_mean < rung.kld_mean})
    return out


def run_frontier(opts: FrontierOptions) -> dict:
    opts.budgets = [parse_budget(b) for b in opts.budgets]
    return Frontier(opts).run()
