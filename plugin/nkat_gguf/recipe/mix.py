"""`nkat mix`: the best GGUF for a byte budget, written by llama.cpp's own quantizer.

statistics (an imatrix, or a covariance file) -> candidate types per tensor -> cost curves on
sampled rows -> allocation at every budget in one sweep -> llama.cpp's quantizer with one exact
per-tensor override each (tt_overrides) -> the written file's tensor types read back and compared
with the recipe, its size with the prediction -> scores against the reference (optional), beside
llama.cpp's stock types of the same reference made with the same imatrix. With --match-speed, each
type's generation speed is measured in llama.cpp first (measure.type_speed) and each budget's
allocation is held to its stock neighbour's predicted speed.

Everything is cached in the work directory by content (costs, stock files, mixes, scores), so a
rerun of the same command resumes and the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import Setting, UserError
from ..formats.embedding_importance import FIRST_NORM
from ..formats.gguf_io import fingerprint_file
from ..measure.scoring import RowKind, ScoredRow
from ..runtime.gptq import DEFAULT_DAMP, REVISION as GPTQ_REVISION
from ..runtime.settings import RuntimeSettings
from ..util.atomic import atomic_path
from ..util.output_paths import check_output_path
from ..util.report import progress, say
from .budgets import MiB, Budget, budget_bytes, parse_budget
from .build import OUTPUT_FLOOR, MixBuilder, check_types
from .candidates import CANDIDATE_TYPES
from .costs import DEFAULT_ROWS
from .fit import spearman
from .layout import tensor_types
from .recipe_file import write_recipe


@dataclass
class MixOptions:
    reference: str
    output: str
    work_dir: str
    budgets: list[str]
    imatrix: str | None = None
    covariance: str | None = None
    calib_text: str | None = None
    calib_chunks: int = 8
    rows: int = DEFAULT_ROWS
    types: list[str] = field(default_factory=lambda: list(CANDIDATE_TYPES))
    compare: list[str] = field(default_factory=list)  # stock types scored beside the mixes
    tie_gate_up: bool = True
    output_floor: str | None = OUTPUT_FLOOR
    fit_chunks: int = 0  # calibration chunks per probe of the role x depth fit; 0: no probes (CLI: fit.DEFAULT_CHUNKS)
    fit_check: bool = False  # also measure the held-out probes that check the fit (Spearman in the report)
    theta: bool = False  # offer a rank-r theta (a .nkat beside the GGUF) as one more option per block matrix
    theta_layers: list[str] = field(default_factory=list)  # GGUF-name globs: only these matrices (default: all)
    gptq: str | None = None  # a covariance file: the chosen tensors rounded by GPTQ in their types (same bytes)
    gptq_priced: bool = False  # GPTQ as a priced option of the allocation instead (recipe.gptq_option)
    gptq_damp: float = DEFAULT_DAMP
    refine: int = 0  # Optuna trials per budget around the allocation, scored on fit_chunks calibration chunks
    refine_storage: str | None = None  # an Optuna RDB URL (default: SQLite in the work dir)
    match_speed: float | None = None  # each mix at least this x the predicted speed of its stock neighbour
    text: str | None = None  # evaluation text; None: no scoring
    skip_impossible: bool = False  # a budget below the smallest possible file: dropped (default: an error)
    chunks: int = 8
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    quiet: bool = False


def stock_type_names() -> dict[str, int]:
    import llama_cpp

    from ..runtime.quantize import ftype_names

    return ftype_names(llama_cpp)


def link_or_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        os.unlink(tmp) if os.path.exists(tmp) else None
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


class Mix:
    def __init__(self, o: MixOptions):
        self.o = o
        self.work = Path(o.work_dir)
        self.timings: dict[str, float] = {}
        self.ref_key = ""
        self._scorer = None  # the calibration text's scorer (calibration_scorer)

    # -- statistics ----------------------------------------------------------------------------
    def imatrix(self) -> str:
        """The imatrix llama.cpp quantizes with: given, the covariance file's diagonal, or calibrated."""
        from ..formats.imatrix import write_imatrix

        o = self.o
        if o.imatrix:
            return o.imatrix
        if o.covariance:
            from ..formats.covariance import CovarianceFile

            cov = CovarianceFile(o.covariance)
            path = self.work / f"{self.ref_key}-{fingerprint_file(o.covariance)[:12]}-diag.imatrix"
            if not path.is_file():
                write_imatrix(path, {w: cov.diagonal(w) for w in cov.users}, dataset=str(o.covariance),
                              chunks=cov.chunk_count, chunk_size=cov.chunk_size)
            return str(path)
        from ..formats.defaults import find_calibration_text
        from ..formats.gguf_io import ModelFile
        from ..measure.ppl import read_text
        from ..runtime.activation_stats import collect

        rs = o.runtime
        path = self.work / f"{self.ref_key}-calib{o.calib_chunks}x{rs.ctx}.imatrix"
        if not path.is_file():
            text = find_calibration_text(o.calib_text)
            say(f"[mix] activation statistics of {Path(o.reference).name} on {text.name}", o.quiet)
            t0 = time.perf_counter()
            stats, facts = collect(o.reference, read_text(text), o.calib_chunks, rs.ctx, rs.threads, rs.flash_attn,
                                   o.quiet)
            write_imatrix(path, stats, dataset=str(text), chunks=facts["chunks"], chunk_size=rs.ctx,
                          architecture=ModelFile(o.reference).architecture)
            self.timings["calibrate"] = time.perf_counter() - t0
        return str(path)

    # -- stock files ---------------------------------------------------------------------------
    def stock(self, qtype: str, imatrix: str) -> Path:
        """llama.cpp's stock `qtype` of the reference with the imatrix (made once, cached)."""
        from ..runtime.quantize import quantize_model

        path = self.work / f"stock-{self.ref_key}-{qtype.upper()}-imat.gguf"
        if not path.is_file():
            say(f"[mix] stock {qtype.upper()} with the imatrix -> {path.name}", self.o.quiet)
            t0 = time.perf_counter()
            quantize_model(self.o.reference, str(path), qtype, self.o.runtime.threads, imatrix=imatrix)
            self.timings[f"stock {qtype.upper()}"] = time.perf_counter() - t0
        return path

    def run(self) -> dict:
        started = time.perf_counter()
        o = self.o
        if o.gptq and o.theta:
            raise UserError("--gptq and --theta cannot be combined: theta is fitted to llama.cpp's own rounding")
        if o.refine and o.theta:
            raise UserError("--refine and --theta cannot be combined: theta is priced once, for the unrefined mix")
        if o.refine and not o.fit_chunks:
            raise UserError("--refine needs --fit-chunks above 0: its trials are scored on that many calibration chunks")
        if o.fit_check and not o.fit_chunks:
            raise UserError("--fit-check needs --fit-chunks above 0: it checks the fit made on the probes")
        for path in (o.reference, o.imatrix, o.covariance, o.gptq, o.text):
            if path and not Path(path).is_file():
                raise UserError(f"file not found: {path}")
        check_output_path(o.output, [o.reference], Setting.OUTPUT)
        gptq_inputs = self.gptq_inputs() if o.gptq else None
        self.ref_key = fingerprint_file(o.reference)[:12]
        stock_names = stock_type_names()
        budgets = [parse_budget(b, stock_names) for b in o.budgets]
        for t in o.compare:
            if t.lower() not in stock_names:
                raise UserError(f"--compare {t!r} is not a llama.cpp type; one of: {', '.join(sorted(stock_names))}")
        if o.match_speed and not (o.compare or any(b.kind == "like" for b in budgets)):
            raise UserError("--match-speed needs a stock file to match: a budget such as Q3_K_S, or --compare TYPES")
        self.work.mkdir(parents=True, exist_ok=True)
        imatrix = self.imatrix()
        t0 = time.perf_counter()
        builder = MixBuilder(o.reference, imatrix, self.work, covariance=o.covariance, rows=o.rows, types=o.types,
                             tie_gate_up=o.tie_gate_up, output_floor=o.output_floor, threads=o.runtime.threads, quiet=o.quiet)
        layout = builder.layout
        self.timings["costs"] = time.perf_counter() - t0
        stock_paths = {t.upper(): self.stock(t, imatrix) for t in
                       dict.fromkeys([b.value for b in budgets if b.kind == "like"] + [c.upper() for c in o.compare])}
        targets = [budget_bytes(b, layout.n_weights, lambda t: stock_paths[t].stat().st_size) for b in budgets]
        stock_types = {t: tensor_types(p) for t, p in stock_paths.items()}  # read once: speed limits, report
        smallest = builder.smallest
        for b, target in zip(budgets, targets):
            if target < smallest and not o.skip_impossible:
                raise UserError(f"budget {b.text} ({target / MiB:.2f} MiB) is below the smallest file this reference "
                                f"allows ({smallest / MiB:.2f} MiB)")
            if target < smallest:
                say(f"[mix] budget {b.text}: below the smallest file this reference allows, skipped", o.quiet)
        possible = [i for i, t in enumerate(targets) if t >= smallest]
        budgets, targets = [budgets[i] for i in possible], [targets[i] for i in possible]
        # the fit (probe files, minutes on a large model) only once every budget is known to be possible
        fitted = self.fit_weights(builder) if o.fit_chunks else None
        weight = fitted.weight if fitted else None
        if fitted:
            builder.set_weights(weight)
        if o.gptq and o.gptq_priced:
            self.offer_gptq(builder)
        speed_targets = self.match_speed(builder, targets, stock_paths, stock_types) if o.match_speed else {}
        allocations = builder.allocate(targets)
        refined = [None] * len(targets)
        if o.refine:
            allocations, refined = self.refine(builder, allocations, targets, weight)
        if o.theta:
            allocations = self.offer_theta(builder, allocations, targets)
        rounded = self.gptq_files(builder, allocations, *gptq_inputs) if o.gptq else [None] * len(allocations)

        outputs = self.output_paths(budgets)
        mixes = []
        for b, target, alloc, out, search, gptq in progress(list(zip(budgets, targets, allocations, outputs, refined,
                                                                  rounded)), desc="files", unit="file", quiet=o.quiet):
            mix = self.write_mix(builder, b, target, alloc, out, fitted is not None, gptq)
            mix.facts["refine"] = search.to_dict() if search else None
            mix.facts["speed_target"] = ({"stock": f"{speed_targets[target]}-imat", "ratio": o.match_speed,
                                          "met": builder.speed_met.get(target)} if target in speed_targets else None)
            mixes.append(mix)
        stock_rows = [ScoredRow(f"{t}-imat", RowKind.STOCK, str(p), facts={
                          "type": t, "file_bytes": p.stat().st_size, "bpw": 8 * p.stat().st_size / layout.n_weights,
                          "predicted_damage": (d := builder.damage(stock_types[t])),
                          "predicted_kld": d if fitted else None,
                          "predicted_tokens_per_second": predicted_speed(builder, stock_types[t])})
                      for t, p in stock_paths.items()]
        result = {"fit": fitted.to_dict() if fitted else None}
        if o.text:
            self.score(mixes, stock_rows, result)
        result = {"mixes": [m.to_dict() for m in mixes], "stock": [r.to_dict() for r in stock_rows]} | result
        result["settings"] = {
            "reference": o.reference,
            "reference_type": Counter(builder.ref_types.values()).most_common(1)[0][0],
            "imatrix": imatrix, "covariance": o.covariance, "rows": o.rows, "types": o.types,
            "embedding_importance": FIRST_NORM if builder.stats.extra else None,
            "tie_gate_up": o.tie_gate_up, "output_floor": o.output_floor, "fit_chunks": o.fit_chunks,
            "fit_check": o.fit_check,
            "theta": o.theta, "theta_layers": o.theta_layers, "gptq": o.gptq, "gptq_priced": o.gptq_priced,
            "gptq_damp": o.gptq_damp if o.gptq else None, "gptq_revision": GPTQ_REVISION if o.gptq else None,
            "refine": o.refine, "match_speed": o.match_speed,
            "type_speed": builder.speed.to_dict() if builder.speed else None,
            "text": o.text, "chunks": o.chunks, "ctx": o.runtime.ctx,
            "flash_attn": o.runtime.flash_attn, "threads": o.runtime.threads, "smallest_bytes": smallest,
            "fixed_bytes": layout.fixed, "n_weights": layout.n_weights,
        }
        result["timings"] = self.timings
        result["wall_seconds"] = time.perf_counter() - started
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result

    @cached_property
    def calibration(self) -> tuple[str, str]:
        """The calibration text the probes and refinement trials are scored on, and the key of those
        scoring settings (text, chunks, ctx, flash attention): the text read and hashed once."""
        from ..formats.defaults import find_calibration_text
        from ..measure.scoring import text_key

        o = self.o
        text = str(find_calibration_text(o.calib_text))
        return text, f"{text_key(text)}-{o.fit_chunks}x{o.runtime.ctx}-fa{int(o.runtime.flash_attn)}"

    def calibration_scorer(self):
        """The reference decoded once on fit_chunks chunks of the calibration text (made on first use)."""
        from ..measure.scoring import Scorer

        if self._scorer is None:
            o = self.o
            self._scorer = Scorer(reference=o.reference, text=self.calibration[0], work=self.work,
                                  runtime=o.runtime, chunks=o.fit_chunks, quiet=True)
        return self._scorer

    def refine(self, builder: MixBuilder, allocations, targets: list[int], weight) -> tuple[list, list]:
        """Each budget's allocation, the best of --refine Optuna trials around it (recipe.refine), and
        each budget's Refinement (None where nothing fits)."""
        from .refine import DB_NAME, refine

        o = self.o
        settings = self.calibration[1]

        def measure(path: Path) -> dict:
            row = self.calibration_scorer().score(ScoredRow(f"refine {path.name}", RowKind.PROBE, str(path)))
            return {k: row.figures[k] for k in ("kld_mean", "kld_err")}

        url = o.refine_storage or f"sqlite:///{(self.work / DB_NAME).resolve()}"
        t0 = time.perf_counter()
        chosen, summaries = [], []
        for alloc, target in zip(allocations, targets):
            summary = None
            if alloc is not None:
                alloc, summary = refine(builder, weight, target, trials=o.refine, measure=measure,
                                        chunks=o.fit_chunks, storage_url=url, settings=settings, quiet=o.quiet)
                alloc.damage = builder.damage(builder.recipe(alloc))  # the fit's units
            chosen.append(alloc)
            summaries.append(summary)
        self.timings["refine"] = time.perf_counter() - t0
        return chosen, summaries

    def match_speed(self, builder: MixBuilder, targets: list[int], stock_paths: dict[str, Path],
                    stock_types: dict[str, dict[str, str]]) -> dict[int, str]:
        """Each type's generation time measured in llama.cpp on this machine (measure.type_speed), and
        each budget's predicted time per token limited to that of the stock file nearest its bytes over
        --match-speed's ratio; budget -> that type."""
        from ..measure.type_speed import measure_type_speed

        o = self.o
        nearest = {target: min(stock_paths, key=lambda t: abs(stock_paths[t].stat().st_size - target))
                   for target in targets}
        wanted = set(o.types) | {stock_types[t][n] for t in set(nearest.values()) for n in builder.costs}
        t0 = time.perf_counter()
        speed = measure_type_speed(o.reference, sorted(wanted), self.work, o.runtime, o.quiet)
        self.timings["type speed"] = time.perf_counter() - t0
        limits = {}
        for target, t in nearest.items():
            own, whole = speed.relative_seconds(stock_types[t]), speed.predicted_seconds(stock_types[t])
            if own is not None:  # else a type no timing model holds: no limit
                limits[target] = own + whole * (1 / o.match_speed - 1)
        builder.set_speed(speed, limits)
        return nearest

    def offer_theta(self, builder: MixBuilder, allocations, targets: list[int]):
        """The allocation again with theta options priced for the types the plain one chose (and the
        next cheaper ones): recipe.theta_option."""
        from .theta_option import THETA_FIXED_BYTES, model_gains, theta_options, types_to_price

        o = self.o
        wanted = types_to_price(builder.costs, [builder.recipe(a) for a in allocations if a], o.theta_layers)
        say(f"[mix] theta priced for {len(wanted)} matrices at {sum(map(len, wanted.values()))} (matrix, type) "
            "pairs (whole-tensor SVDs of the residual)", o.quiet)
        t0 = time.perf_counter()
        gains = model_gains(o.reference, builder.stats, wanted, self.work, o.runtime.threads, o.quiet)
        self.timings["theta gains"] = time.perf_counter() - t0
        builder.set_extras(theta_options(builder.costs, gains), THETA_FIXED_BYTES)
        return builder.allocate(targets)

    def offer_gptq(self, builder: MixBuilder) -> None:
        """GPTQ rounding under --gptq's covariance as one more option per covered block matrix and
        type, priced on the sampled rows (recipe.gptq_option)."""
        from .gptq_option import gptq_options, model_shares

        o = self.o
        say(f"[mix] GPTQ priced under {Path(o.gptq).name} on {o.rows} sampled rows per matrix", o.quiet)
        t0 = time.perf_counter()
        shares = model_shares(o.reference, builder.stats, o.gptq, builder.costs, o.gptq_damp, o.rows, self.work,
                              o.runtime.threads, o.quiet)
        self.timings["gptq prices"] = time.perf_counter() - t0
        builder.set_extras(gptq_options(builder.costs, shares))

    def gptq_inputs(self):
        """--gptq's covariance and the reference, opened and checked before any work: (cov, source)."""
        from ..formats.covariance import CovarianceFile
        from ..formats.gguf_io import ModelFile
        from ..runtime.gptq_file import check_covariance, check_damp

        check_damp(self.o.gptq_damp)
        cov, source = CovarianceFile(self.o.gptq), ModelFile(self.o.reference)
        check_covariance(cov, source, self.o.gptq, self.o.reference, Setting.GPTQ_COVARIANCE)
        return cov, source

    def gptq_files(self, builder: MixBuilder, allocations, cov, source) -> list[tuple[Path, set] | None]:
        """Per allocation, its file with tensors rounded by GPTQ under --gptq's covariance in their
        types (runtime.gptq_file: same types, same bytes), and which: every tensor GPTQ can round, or
        with --gptq-priced those given a 'T+gptq' option (gptq_option.rounded_tensors); None where the
        allocation is None or rounds nothing. All files in one pass, so each input's factor is
        computed once; cached by content (the plain file and the rounded tensors)."""
        from contextlib import ExitStack

        from ..runtime.gptq_file import rewrite_files
        from .gptq_option import rounded_tensors

        o = self.o
        tag = f"gptq{GPTQ_REVISION}-{fingerprint_file(o.gptq)[:12]}-d{o.gptq_damp:g}"
        out, wanted = [], {}  # wanted: GPTQ file -> (plain file, tensors GPTQ rounds)
        for a in allocations:
            rounded = rounded_tensors(builder.recipe(a), builder.costs, cov, o.gptq_priced) if a else set()
            if not rounded:
                out.append(None)
                continue
            plain = builder.write(builder.types(a))
            chosen = hashlib.sha256(json.dumps(sorted(rounded)).encode()).hexdigest()[:8]
            path = plain.with_name(f"{plain.stem}-{tag}-{chosen}.gguf")
            wanted[path] = (plain, rounded)
            out.append((path, rounded))
        todo = [p for p in wanted if not p.is_file()]
        if todo:
            say(f"[mix] GPTQ rounding of {len(todo)} file(s) under {Path(o.gptq).name}", o.quiet)
            t0 = time.perf_counter()
            sets = [wanted[p][1] for p in todo]
            with ExitStack() as stack:
                tmps = [stack.enter_context(atomic_path(p, [str(wanted[p][0])])) for p in todo]
                for p, tmp in zip(todo, tmps):
                    shutil.copyfile(wanted[p][0], tmp)
                rewrite_files([str(t) for t in tmps], source, cov, o.gptq_damp, threads=o.runtime.threads,
                              quiet=o.quiet, skip=lambda i, name, type_name: name not in sets[i])
            self.timings["gptq"] = time.perf_counter() - t0
        return out

    def write_mix(self, builder: MixBuilder, b: Budget, target: int, alloc, out: str, fitted: bool,
                  gptq: tuple[Path, set] | None) -> ScoredRow:
        """The budget's GGUF (and .nkat where the allocation chose theta; with --gptq, its file with
        tensors rounded by GPTQ and which), checked against the budget, linked to its output name
        with the recipe beside it; its row for the report."""
        from .gptq_option import split_gptq
        from .theta_option import split_recipe, write_theta

        o, costs, layout = self.o, builder.costs, builder.layout
        options = builder.recipe(alloc)
        recipe, ranks = split_recipe(split_gptq(options)[0])
        gptq_names = gptq[1] if gptq else set()
        t0 = time.perf_counter()
        if gptq is not None:  # the plain file was written (and checked) before GPTQ rounded its copy
            check_types(gptq[0], recipe)
            path = gptq[0]
        else:
            path = builder.write(recipe)
        theta = None
        if ranks:
            theta = self.work / f"theta-{self.ref_key}-{builder.key(options)}.nkat"
            if not theta.is_file():
                write_theta(str(path), o.reference, ranks, str(theta), builder.stats)
        self.timings[f"quantize {b.tag}"] = time.perf_counter() - t0
        gguf_bytes = path.stat().st_size
        theta_bytes = theta.stat().st_size if theta else 0
        size = gguf_bytes + theta_bytes
        if size > target:
            raise UserError(f"budget {b.text}: llama.cpp wrote {size} bytes, the allocation predicted {alloc.bytes} "
                            f"(<= {target}); the header differs from the reference's")
        link_or_copy(path, Path(out))
        theta_out = None
        if theta:
            theta_out = str(Path(out).with_suffix(".nkat"))
            link_or_copy(theta, Path(theta_out))
        write_recipe(Path(out).with_suffix(".recipe.txt"), recipe)

        label = f"mix {b.tag}" + (" + theta" if theta else "") + (" gptq" if gptq_names else "")
        return ScoredRow(label, RowKind.MIX, str(path), str(theta) if theta else None, facts={
            "budget": b.text, "budget_bytes": target, "output": str(out),
            "recipe": str(Path(out).with_suffix(".recipe.txt")), "theta_output": theta_out, "theta_offered": o.theta,
            "theta_matrices": len(ranks), "gptq_priced": bool(o.gptq and o.gptq_priced),
            "gptq_matrices": len(gptq_names),
            "theta_bytes": theta_bytes, "gguf_bytes": gguf_bytes, "predicted_bytes": alloc.bytes, "file_bytes": size,
            "bpw": 8 * size / layout.n_weights, "predicted_damage": alloc.damage,
            "predicted_kld": alloc.damage if fitted else None,
            "predicted_tokens_per_second": predicted_speed(builder, recipe),
            "type_counts": dict(Counter(recipe.values())),
            "tensors": [{"name": n, "type": recipe[n], "theta_rank": ranks.get(n, 0), "gptq": n in gptq_names,
                         "bytes": costs[n].options[recipe[n]][0], "relative_damage": builder.relative(n, option)}
                        for n, option in options.items()],
        })

    def fit_weights(self, builder: MixBuilder):
        """Probe files (one group at a probe type, the rest as stored) scored on the calibration text,
        one at a time, each deleted once scored (its scores kept in probes.json by recipe key);
        the role x depth weights fitted on them (recipe.fit)."""
        from ..util.atomic import write_text_atomic
        from . import fit as fitting

        o = self.o
        text, settings = self.calibration
        plan = fitting.probes(builder.costs, held_out=o.fit_check)
        store = self.work / "probes.json"
        known = json.loads(store.read_text()) if store.is_file() else {}
        recipes = [fitting.probe_recipe(p, builder.costs, builder.ref_types) for p in plan]
        keys = [f"{builder.key(recipe)}-{settings}" for recipe in recipes]
        say(f"[mix] {len(plan)} probes for the role x depth weights, {sum(k not in known for k in keys)} to measure "
            f"({o.fit_chunks} chunks of {Path(text).name})", o.quiet)
        t0 = time.perf_counter()
        for p, recipe, key in progress(list(zip(plan, recipes, keys)), desc="probes", unit="probe", quiet=o.quiet):
            if key not in known:  # the reference is decoded only if a probe is measured
                path = builder.write(recipe)
                row = self.calibration_scorer().score(ScoredRow(f"probe {p.name}", RowKind.PROBE, str(path)))
                known[key] = {"probe": p.name, "kld_mean": row.kld_mean, "kld_err": row.figures["kld_err"]}
                write_text_atomic(store, json.dumps(known, indent=1))
                path.unlink()
            p.kld, p.kld_err = known[key]["kld_mean"], known[key]["kld_err"]
        self.timings["probes"] = time.perf_counter() - t0
        return fitting.fit(plan, builder.costs)

    def output_paths(self, budgets: list[Budget]) -> list[str]:
        out = Path(self.o.output)
        if len(budgets) == 1:
            return [str(out)]
        return [str(out.with_name(f"{out.stem}-{b.tag}{out.suffix}")) for b in budgets]

    def score(self, mixes: list[ScoredRow], stock_rows: list[ScoredRow], result: dict) -> None:
        """Measured KLD/PPL of every mix and stock file; predicted KLD = a x predicted damage, a fitted
        through the origin on this run's scored files, and the rank agreement of the two."""
        from ..measure.scoring import score_rows

        o = self.o
        rows = mixes + stock_rows
        t0 = time.perf_counter()
        n_chunks, runtime_settings = score_rows(rows, reference=o.reference, text=o.text, work=self.work,
                                                runtime=o.runtime, chunks=o.chunks, quiet=o.quiet)
        self.timings["scoring"] = time.perf_counter() - t0
        fit = [(r.facts["predicted_damage"], r.kld_mean) for r in rows if r.facts["predicted_damage"] is not None]
        x = np.array([p for p, _ in fit])
        y = np.array([k for _, k in fit])
        scale = float(x @ y / (x @ x)) if len(fit) and x @ x > 0 else None
        fitted = result.get("fit") is not None
        for r in rows:  # without probes: one scale fitted through the origin on these files
            if not fitted:
                d = r.facts["predicted_damage"]
                r.facts["predicted_kld"] = scale * d if scale is not None and d is not None else None
        for m in mixes:
            near = min(stock_rows, key=lambda s: abs(s.facts["file_bytes"] - m.facts["file_bytes"]), default=None)
            m.facts["nearest_stock"] = None if near is None else {
                "label": near.label, "file_bytes": near.facts["file_bytes"],
                **{k: near.figures[k] for k in ("kld_mean", "kld_err", "kld_p99", "ppl", "ppl_err", "top1_agreement")}}
        result["prediction"] = {"kld_per_damage": None if fitted else scale, "files": len(fit),
                                "from": "probes on the calibration text" if fitted else "these files (in sample)",
                                "spearman_predicted_vs_measured": spearman(x, y) if len(fit) else None}
        result["chunks_scored"] = n_chunks
        result["runtime"] = runtime_settings


def predicted_speed(builder: MixBuilder, types: dict[str, str]) -> float | None:
    """Generation tokens/s of a file with these tensor types, predicted from the types' measured
    speeds (--match-speed; None without)."""
    seconds = builder.speed.predicted_seconds(types) if builder.speed else None
    return 1 / seconds if seconds else None


def run_mix(opts: MixOptions) -> dict:
    return Mix(opts).run()
