"""A trial of nkat optimize: its theta written from cached SVD factors and scored on the study's chunks.

What makes a trial cheap:
  * the SVD factors P, Q (E ~ P Q^T) are computed once per source at the largest rank and
    truncated per trial (structure is only a re-arrangement of P, Q);
  * the reference's log-probs (a LogprobStore in the scratch dir) and the baseline's figures are
    computed once per process on the study's chunks, so a trial decodes only the candidate;
  * a trial writes one INT8 adapter at a fixed file gamma and applies its gamma at run time
    (Runtime.set_gamma); consecutive trials with the same adapter reuse the loaded model.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..formats.gguf_io import ModelFile
from ..formats.keys import NkatKeys
from ..formats.nkat_format import write_nkat
from ..measure.evaluate import LogprobStore, check_same_vocab, chunk_count, fill_store, score_model
from ..measure.tpe import tpe
from ..measure.rows import pick, score_row
from ..runtime.engine import Runtime
from ..theta import lowrank as theta_math
from ..theta.pipeline import Allocation, Pricing, Statistics, choose_ranks, factor_loop, theta_meta, thetas
from ..util.atomic import pid_alive
from .options import OptimizeOptions
from .space import THETA_TYPE, group_of

FILE_GAMMA = 1.0  # trial adapters are written at this gamma; the trial's gamma is a run-time scale
OVERHEAD_SEQ_LEN, OVERHEAD_ITERATIONS = 64, 16  # --max-overhead: a short generation benchmark per adapter
SCRATCH_PREFIX = ".nkat-optimize-"


# -- factors: one SVD per source at the largest rank, truncated per trial ----------------------
class FactorCache:
    def __init__(self, model: ModelFile, reference: ModelFile | None, names: list[str], max_rank: int,
                 imatrix: str | None, quiet: bool, covariance: str | None = None):
        self.model, self.reference, self.names = model, reference, names
        self.max_rank, self.imatrix, self.covariance, self.quiet = max_rank, imatrix, covariance, quiet
        self._pq: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self._stats: dict[str, Statistics] = {}
        self.seconds: dict[str, float] = {}

    def statistics(self, source: str) -> Statistics:
        """The source's statistics (opened once; a bad file fails here)."""
        if source not in self._stats:
            self._stats[source] = Statistics(source, self.names, self.imatrix, self.covariance)
        return self._stats[source]

    def factors(self, source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if source not in self._pq:
            started = time.perf_counter()
            ranks = {n: min(self.max_rank, min(self.model.shape(n))) for n in self.names}
            self._pq[source] = factor_loop(self.model, self.reference, source, self.statistics(source), ranks,
                                           f"SVD ({source}, rank {self.max_rank})", self.quiet)
            self.seconds[source] = time.perf_counter() - started
        return self._pq[source]

    def pricing(self, config: dict) -> tuple[Pricing, dict[str, int], int | None]:
        """The configuration's pricing, uniform ranks and byte budget (None: uniform allocation),
        from the shapes alone. A budget allocation re-spends the file bytes of the uniform ranks by
        the greedy cut, priced as nkat convert prices them: `nkat convert --budget-mb` with that
        budget makes the same choice."""
        groups = set(config["groups"])
        shapes = {n: self.model.shape(n) for n in self.names if group_of(n) in groups}
        pricing = Pricing(shapes, {n: theta_math.resolve_structure(config["structure"], s) for n, s in shapes.items()},
                          THETA_TYPE)
        uniform = {n: min(config["rank"], self.max_rank, min(s)) for n, s in shapes.items()}
        budgeted = config.get("allocation", Allocation.UNIFORM) == Allocation.BUDGET
        return pricing, uniform, pricing.file_bytes(uniform) if budgeted else None

    def budget_of(self, config: dict) -> int | None:
        return self.pricing(config)[2]

    def plan(self, config: dict) -> tuple[dict, Pricing, dict[str, int], int | None]:
        """The configuration's factors, pricing, ranks and byte budget (None: uniform ranks)."""
        pricing, uniform, budget = self.pricing(config)
        pq = self.factors(config["source"])
        chosen = {n: pq[n] for n in pricing.shapes}
        ranks = uniform if budget is None else choose_ranks(chosen, pricing, config["rank"], budget)
        return chosen, pricing, ranks, budget

    def predicted_bytes(self, config: dict) -> int:
        """The theta bytes the configuration's file holds, from the pricing alone."""
        _, pricing, ranks, _ = self.plan(config)
        return pricing.theta_bytes(ranks)

    def write(self, path, config: dict, gamma: float, extra: dict | None = None) -> int:
        """Write the configuration's theta as a .nkat at `gamma`; returns theta bytes."""
        chosen, pricing, ranks, budget = self.plan(config)
        factors = thetas(chosen, pricing, ranks)
        meta = theta_meta(self.model, self.reference, factors, pricing, rank=config["rank"], gamma=gamma,
                          source=config["source"], structure=config["structure"], imatrix=self.imatrix,
                          covariance=self.covariance, budget=budget,
                          extra={NkatKeys.Extra.GROUPS: ",".join(config["groups"])} | (extra or {}))
        return write_nkat(path, self.model.architecture, factors, meta)


# -- scoring: reference and baseline once, candidates per trial ---------------------------------
class TrialScorer:
    """The study's chunks, the reference's log-probs on them and the baseline's figures."""

    def __init__(self, opts: OptimizeOptions, text: bytes, base_bytes: int):
        """Load the base (and reference), tokenize and check the chunk count; decodes nothing."""
        self.opts = opts
        self.base_bytes = base_bytes
        self._base = Runtime.from_settings(opts.model, None, opts.runtime)
        self._ref = None
        try:
            if opts.reference:
                self._ref = Runtime.from_settings(opts.reference, None, opts.runtime)
                check_same_vocab([self._base, self._ref])
            self.tokens = self._base.tokenize(text)
            self.n_chunks = chunk_count(len(self.tokens), opts.runtime.ctx, opts.chunks)
            self.available_chunks = len(self.tokens) // opts.runtime.ctx
        except BaseException:
            self.close()
            raise
        self.store: LogprobStore | None = None
        self.reference: dict | None = None
        self.baseline: dict | None = None

    def prepare(self, store_dir: Path) -> None:
        """Decode the reference (its log-probs kept in a LogprobStore at `store_dir`) and the
        baseline, once; the models are closed afterwards."""
        opts = self.opts
        try:
            if self._ref is not None:
                self.store = LogprobStore(store_dir)
                self.reference = fill_store(self._ref, self.tokens, opts.runtime.ctx, self.n_chunks, self.store, opts.quiet)
            self.baseline = self.score(self._base, desc="baseline")
            self.baseline["tpe"] = tpe(self.baseline["ppl"])
        finally:
            self.close()

    def close(self) -> None:
        for rt in (self._base, self._ref):
            if rt is not None:
                rt.close()
        self._base = self._ref = None

    def score(self, runtime, desc: str = "trial") -> dict:
        result = score_model(runtime, self.tokens, self.opts.runtime.ctx, self.n_chunks, self.store, self.opts.quiet, desc)
        return result | {"decode_seconds": result["eval_seconds"]}

    def figures(self, result: dict, theta_bytes: int) -> dict:
        """A trial's numbers: PPL, KLD, TPE, bytes, gap recovered, overhead vs the baseline decode."""
        out = score_row(pick(result, ("ppl", "ppl_err", "kld_mean", "kld_p99", "top1_agreement", "chunks",
                                      "decode_seconds")),
                        self.base_bytes, theta_bytes, base_ppl=self.baseline["ppl"],
                        reference_ppl=self.reference["ppl"] if self.reference else None)
        base_s = self.baseline["decode_seconds"]
        out["overhead_pct"] = 100.0 * (result["decode_seconds"] / base_s - 1.0) if base_s else None
        return out


class TrialRunner:
    """Turns a configuration into measured figures; keeps the last adapter's model loaded."""

    def __init__(self, opts: OptimizeOptions, factors: FactorCache, scorer: TrialScorer):
        self.opts, self.factors, self.scorer = opts, factors, scorer
        # Scratch lives in the output dir (never the system temp dir); a killed run's is removed
        # by the next run there (remove_stale_scratch).
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=opts.output_dir))
        self._key = None
        self._rt: Runtime | None = None
        self._theta_bytes = 0
        self._overhead: dict = {}
        self.loads = 0

    def evaluate(self, config: dict) -> dict:
        if not config["groups"]:
            # No group carries theta: this is the baseline itself (nothing to decode).
            return self.scorer.figures(self.scorer.baseline, 0) | {"overhead_pct": 0.0, "no_theta": True,
                                                                      "tensors": 0, "model_loads": 0}
        key = (config["source"], config["structure"], config["rank"], tuple(config["groups"]),
               config.get("allocation", Allocation.UNIFORM))
        loads = 0
        if key != self._key:
            self._close_runtime()
            path = self.scratch / "trial.nkat"
            self._theta_bytes = self.factors.write(path, config, FILE_GAMMA)
            self._rt = Runtime.from_settings(self.opts.model, path, self.opts.runtime, gamma=config["gamma"])
            self._key = key
            self.loads += 1
            loads = 1
        else:
            self._rt.set_gamma(config["gamma"])  # same adapter: change gamma without reloading
        result = self.scorer.score(self._rt)
        tensors = sum(1 for n in self.factors.names if group_of(n) in set(config["groups"]))
        figures = self.scorer.figures(result, self._theta_bytes)
        figures["decode_overhead_pct"] = figures["overhead_pct"]
        figures["overhead_measure"] = "decode"
        if self.opts.max_overhead is not None:
            figures["overhead_pct"] = self.generation_overhead(key, config["gamma"])
            figures["overhead_measure"] = "generation"
        return figures | {"no_theta": False, "tensors": tensors, "model_loads": loads}

    def generation_overhead(self, key, gamma: float) -> float:
        """Generation slowdown in percent (bench.measure_overhead), once per adapter."""
        if key not in self._overhead:
            from ..measure.bench import measure_overhead

            settings = self.opts.runtime
            res = measure_overhead(self.opts.model, str(self.scratch / "trial.nkat"), settings.backend, gamma,
                                   seq_len=OVERHEAD_SEQ_LEN, iterations=OVERHEAD_ITERATIONS, repeats=3,
                                   threads=settings.threads)
            self._overhead[key] = float(res["overhead_percentage"])
        return self._overhead[key]

    def _close_runtime(self) -> None:
        if self._rt is not None:
            self._rt.close()
            self._rt = None
            self._key = None

    def close(self) -> None:
        self._close_runtime()
        shutil.rmtree(self.scratch, ignore_errors=True)


def remove_stale_scratch(output_dir: str | os.PathLike) -> None:
    """Delete scratch directories in `output_dir` left by workers that are gone."""
    pattern = re.compile(rf"^{re.escape(SCRATCH_PREFIX)}(\d+)-")
    with contextlib.suppress(OSError):
        for entry in os.scandir(output_dir):
            m = pattern.match(entry.name)
            if m and entry.is_dir(follow_symlinks=False) and not pid_alive(int(m.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)

