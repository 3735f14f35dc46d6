"""nkat optimize: an Optuna study for the theta with the best TPE (the seed's nkat_auto_optimizer).

Search space: source (those the inputs allow), structure, size (the bytes of a uniform rank R),
allocation of those bytes (uniform rank R, or the global greedy cut by singular value^2 per byte
of theta.allocate_ranks), gamma (each source's range from theta.SOURCE_TABLE), and which tensor
groups (attention q/k/v/o, ffn gate/up/down) carry theta. Objective: maximize
evaluate.tpe on a fixed set of chunks. Constraints (--max-kld, --max-overhead) go through
Optuna's constraint support: a trial over a bar is recorded with its figures but cannot win.

What makes a trial cheap:
  * the SVD factors P, Q (E ~ P Q^T) are computed once per source at the largest rank and
    truncated per trial (structure is only a re-arrangement of P, Q);
  * the reference's log-probs and the baseline's figures are computed once per process on the
    study's chunks, so a trial decodes only the candidate;
  * a trial writes one INT8 adapter at a fixed file gamma and applies its gamma at run time
    (Runtime.set_gamma); consecutive trials with the same adapter reuse the loaded model.

Storage: an SQLite file in the output dir by default, any Optuna RDB URL otherwise (PostgreSQL
lets several machines share one study). The budget is a number of COMPLETE trials shared by all
workers; a killed worker's trial in flight is failed and re-queued (at once when the dead
process is on this machine, after the heartbeat grace period otherwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..theta import lowrank as theta_math
from ..util.atomic import pid_alive
from ..theta.convert import TENSOR_OVERHEAD, Statistics, correction_pq, truncated_theta
from ..errors import UserError
from ..measure.evaluate import Accumulator, check_ctx, check_same_vocab, chunk_count, chunk_logprobs, gap_recovered, tpe
from ..formats.gguf_io import ModelFile
from ..formats.nkat_format import NkatMeta, ThetaFactors, factor_bytes, write_nkat
from ..util.output_paths import check_output_dir
from ..util.redaction import redact_url, scrub
from ..util.report import progress, say
from ..runtime.engine import BACKENDS, Runtime

MODES = {"quick": 12, "full": 100}
# Tensor groups that may carry theta: group label -> the weight's name inside a block.
GROUPS = {
    "attn_q": "attn_q",
    "attn_k": "attn_k",
    "attn_v": "attn_v",
    "attn_o": "attn_output",
    "ffn_gate": "ffn_gate",
    "ffn_up": "ffn_up",
    "ffn_down": "ffn_down",
}
_GROUP_OF = {suffix: label for label, suffix in GROUPS.items()}
_BLOCK_NAME = re.compile(r"^blk\.\d+\.([A-Za-z0-9_]+)\.weight$")
STRUCTURE_CHOICES = ("general", "auto")  # auto = antisymmetric (the NKAT form) where square
RANK_LOW, RANK_HIGH, RANK_STEP = 8, 64, 8
ALLOCATIONS = ("uniform", "budget")  # budget: the bytes of uniform rank R, ranks by the greedy cut
FILE_GAMMA = 1.0  # trial adapters are written at this gamma; the trial's gamma is a run-time scale
THETA_TYPE = "q8_0"
DEFAULT_CHUNKS = 2
DEFAULT_FINAL_CHUNKS = 8
DEFAULT_STUDY_NAME = "nkat"
DB_NAME = "optuna_study.db"
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a running trial without a heartbeat for this long is failed and re-queued
MAX_RETRY = 2
WAIT_POLL = 2.0
OVERHEAD_SEQ_LEN, OVERHEAD_ITERATIONS = 64, 16  # --max-overhead: a short generation benchmark per adapter
ATTR_SPACE = "nkat_search_space"
ATTR_SETUP = "nkat_setup"
SCRATCH_PREFIX = ".nkat-optimize-"


@dataclass
class OptimizeOptions:
    model: str
    output_dir: str
    text: str
    reference: str | None = None
    imatrix: str | None = None
    covariance: str | None = None
    mode: str = "quick"
    trials: int | None = None
    storage: str | None = None
    study_name: str = DEFAULT_STUDY_NAME
    backend: str = "lora"
    target_rank: int | None = None
    max_kld: float | None = None
    max_overhead: float | None = None
    chunks: int = DEFAULT_CHUNKS
    final_chunks: int = DEFAULT_FINAL_CHUNKS
    ctx: int = 512
    threads: int | None = None
    flash_attn: bool = False
    seed: int | None = None
    quiet: bool = False
    given_theta: str | None = None  # --model X.nkat: X is scored beside the best trial in the final check
    extra: dict = field(default_factory=dict)


def trial_budget(mode: str, trials: int | None) -> int:
    """quick = 12, full = 100, custom = --trials."""
    if mode == "custom":
        if trials is None or trials <= 0:
            raise UserError("--mode custom needs --trials N (a positive number)")
        return int(trials)
    if mode not in MODES:
        raise UserError(f"--mode must be quick, full or custom, not {mode!r}")
    if trials is not None:
        raise UserError(f"--trials is for --mode custom (--mode {mode} runs {MODES[mode]} trials)")
    return MODES[mode]


def group_of(name: str) -> str | None:
    m = _BLOCK_NAME.match(name)
    return _GROUP_OF.get(m.group(1)) if m else None


def gamma_param(source: str) -> str:
    """The Optuna parameter of a source's gamma: the residual sources share one (same range)."""
    return "gamma" if theta_math.source_info(source).needs_reference else "gamma_weight"


def layer_globs(groups: list[str]) -> list[str]:
    """The --selective-layers globs of nkat convert that select these groups."""
    return [f"blk.*.{GROUPS[g]}.weight" for g in groups]


# -- search space -----------------------------------------------------------------------------
@dataclass
class SearchSpace:
    sources: list[str]
    groups: list[str]
    structures: list[str] = field(default_factory=lambda: list(STRUCTURE_CHOICES))
    rank: dict = field(default_factory=lambda: {"low": RANK_LOW, "high": RANK_HIGH, "step": RANK_STEP})
    gamma: dict = field(default_factory=dict)
    allocations: list[str] = field(default_factory=lambda: list(ALLOCATIONS))
    theta_type: str = THETA_TYPE

    def __post_init__(self):
        for source in self.sources:
            self.gamma.setdefault(source, list(theta_math.source_info(source).gamma_range))

    @classmethod
    def for_inputs(cls, has_reference: bool, has_imatrix: bool, groups: list[str], target_rank: int | None,
                   has_covariance: bool = False):
        """The sources of theta.SOURCE_TABLE that these inputs make possible, in table order."""
        have = {None: True, "diagonal": has_imatrix, "covariance": has_covariance}
        sources = [s.name for s in theta_math.SOURCE_TABLE.values()
                   if (has_reference or not s.needs_reference) and have[s.statistics]]
        space = cls(sources=sources, groups=groups)
        if target_rank is not None:
            space.rank = {"fixed": int(target_rank)}
        return space

    @property
    def max_rank(self) -> int:
        return self.rank.get("fixed") or self.rank["high"]

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "groups": list(self.groups), "structures": list(self.structures),
                "rank": dict(self.rank), "gamma": {k: list(v) for k, v in self.gamma.items()},
                "allocations": list(self.allocations), "theta_type": self.theta_type}

    def suggest(self, trial) -> dict:
        """Sample one configuration; returns the resolved parameters."""
        source = trial.suggest_categorical("source", self.sources)
        structure = trial.suggest_categorical("structure", self.structures)
        if "fixed" in self.rank:
            rank = self.rank["fixed"]
        else:
            rank = trial.suggest_int("rank", self.rank["low"], self.rank["high"], step=self.rank["step"])
        allocation = trial.suggest_categorical("allocation", self.allocations)
        low, high = self.gamma[source]
        gamma = trial.suggest_float(gamma_param(source), low, high)
        groups = [g for g in self.groups if trial.suggest_categorical(g, [True, False])]
        return {"source": source, "structure": structure, "rank": int(rank), "gamma": float(gamma),
                "groups": groups, "allocation": allocation}

    def default_params(self) -> dict:
        """The trial queued first in a new study: the best-known recipe (REFERENCE.md section 2)."""
        source = self.sources[-1]  # the table's last possible: residual-cov > residual-act > residual > weight
        params = {"source": source, "structure": "general", "allocation": "uniform",
                  gamma_param(source): theta_math.source_info(source).default_gamma}
        if "fixed" not in self.rank:
            lo, hi, step = self.rank["low"], self.rank["high"], self.rank["step"]
            params["rank"] = min(hi, max(lo, lo + step * round((32 - lo) / step)))
        params.update({g: True for g in self.groups})
        return params


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
            stats = self.statistics(source)
            pq = {}
            for name in progress(self.names, desc=f"SVD ({source}, rank {self.max_rank})", quiet=self.quiet,
                                 unit="tensor"):
                rank = min(self.max_rank, min(self.model.shape(name)))
                pq[name] = correction_pq(self.model, self.reference, name, source, rank, stats.scales.get(name),
                                         stats.root(name))
            self._pq[source] = pq
            self.seconds[source] = time.perf_counter() - started
        return self._pq[source]

    def theta_factors(self, config: dict) -> list[ThetaFactors]:
        pq = self.factors(config["source"])
        groups = set(config["groups"])
        chosen = [n for n in self.names if group_of(n) in groups]
        structures = {n: theta_math.resolve_structure(config["structure"], self.model.shape(n)) for n in chosen}
        ranks = {n: min(config["rank"], pq[n][0].shape[1]) for n in chosen}
        if config.get("allocation", "uniform") == "budget":
            ranks = self._budget_ranks(pq, chosen, structures, ranks)
        return [truncated_theta(n, *pq[n], ranks[n], structures[n]) for n in chosen if ranks[n] > 0]

    def _budget_ranks(self, pq, chosen, structures, uniform) -> dict[str, int]:
        """The bytes of the uniform ranks, re-spent by the greedy cut (theta.allocate_ranks)."""
        costs, first, gains = {}, {}, {}
        for n in chosen:
            per_component = 2 if structures[n] == "antisymmetric" else 1
            costs[n] = per_component * factor_bytes(*self.model.shape(n), 1, THETA_TYPE)
            first[n] = TENSOR_OVERHEAD
            gains[n] = (pq[n][0].astype(np.float64) ** 2).sum(axis=0)
        budget = sum(uniform[n] * costs[n] + first[n] for n in chosen)
        return theta_math.allocate_ranks(gains, costs, budget, first)

    def write(self, path, config: dict, gamma: float, extra: dict | None = None) -> int:
        """Write the configuration's theta as a .nkat at `gamma`; returns theta bytes."""
        factors = self.theta_factors(config)
        meta = NkatMeta(
            theta_rank=config["rank"], theta_gamma=gamma, source=config["source"],
            structure=config["structure"], theta_type=THETA_TYPE, base=self.model.identity(),
            reference=self.reference.identity() if self.reference is not None else None,
            imatrix=str(self.imatrix or ""),
            extra={"rank_allocation": config.get("allocation", "uniform"), "groups": ",".join(config["groups"]),
                   "covariance": str(self.covariance or "")} | (extra or {}),
        )
        return write_nkat(path, self.model.architecture, factors, meta)


# -- scoring: reference and baseline once, candidates per trial ---------------------------------
class ChunkScorer:
    """The study's chunks, the reference's log-probs on them and the baseline's figures."""

    def __init__(self, opts: OptimizeOptions, text: bytes, base_bytes: int):
        """Load the base (and reference), tokenize and check the chunk count; decodes nothing."""
        self.opts = opts
        self.base_bytes = base_bytes
        rt_kwargs = dict(n_ctx=opts.ctx, n_threads=opts.threads, flash_attn=opts.flash_attn)
        self._base = Runtime(opts.model, **rt_kwargs)
        self._ref = None
        try:
            if opts.reference:
                self._ref = Runtime(opts.reference, **rt_kwargs)
                check_same_vocab([self._base, self._ref])
            self.tokens = self._base.tokenize(text)
            self.n_chunks = chunk_count(len(self.tokens), opts.ctx, opts.chunks)
            self.available_chunks = len(self.tokens) // opts.ctx
        except BaseException:
            self.close()
            raise
        self.ref_logp: list[np.ndarray | None] = [None] * self.n_chunks
        self.reference: dict | None = None
        self.baseline: dict | None = None

    def prepare(self) -> None:
        """Decode the reference (log-probs kept per chunk) and the baseline, once."""
        opts = self.opts
        try:
            if self._ref is not None:
                ref_acc = Accumulator()
                for c in progress(range(self.n_chunks), desc="reference", quiet=opts.quiet, unit="chunk"):
                    logp, targets = chunk_logprobs(self._ref, self.tokens, opts.ctx, c)
                    self.ref_logp[c] = np.array(logp, dtype=np.float32)
                    ref_acc.add(logp, targets, None)
                self.reference = ref_acc.result() | {"chunks": self.n_chunks}
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
        acc = Accumulator()
        seconds = 0.0
        for c in progress(range(self.n_chunks), desc=desc, quiet=self.opts.quiet, unit="chunk"):
            t0 = time.perf_counter()
            logp, targets = chunk_logprobs(runtime, self.tokens, self.opts.ctx, c)
            seconds += time.perf_counter() - t0
            acc.add(logp, targets, self.ref_logp[c])
        return acc.result() | {"chunks": self.n_chunks, "decode_seconds": seconds}

    def figures(self, result: dict, theta_bytes: int) -> dict:
        """A trial's numbers: PPL, KLD, TPE, bytes, gap recovered, overhead vs the baseline decode."""
        out = {k: result.get(k) for k in ("ppl", "ppl_err", "kld_mean", "kld_p99", "top1_agreement",
                                           "chunks", "decode_seconds")}
        out["theta_bytes"] = int(theta_bytes)
        out["bytes"] = int(self.base_bytes + theta_bytes)
        out["rho"] = theta_bytes / self.base_bytes
        out["tpe"] = tpe(result["ppl"], theta_bytes, self.base_bytes)
        out["gap_recovered"] = (gap_recovered(self.baseline["ppl"], result["ppl"], self.reference["ppl"])
                                if self.reference else None)
        base_s = self.baseline["decode_seconds"]
        out["overhead_pct"] = 100.0 * (result["decode_seconds"] / base_s - 1.0) if base_s else None
        return out


class TrialRunner:
    """Turns a configuration into measured figures; keeps the last adapter's model loaded."""

    def __init__(self, opts: OptimizeOptions, factors: FactorCache, scorer: ChunkScorer):
        self.opts, self.factors, self.scorer = opts, factors, scorer
        # Scratch lives in the output dir (never the system temp dir); a killed run's is removed
        # by the next run there (remove_stale_scratch).
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=opts.output_dir))
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
               config.get("allocation", "uniform"))
        loads = 0
        if key != self._key:
            self._close_runtime()
            path = self._tmp / "trial.nkat"
            self._theta_bytes = self.factors.write(path, config, FILE_GAMMA)
            self._rt = Runtime(self.opts.model, path, backend=self.opts.backend, gamma=config["gamma"],
                               n_ctx=self.opts.ctx, n_threads=self.opts.threads, flash_attn=self.opts.flash_attn)
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

            res = measure_overhead(self.opts.model, str(self._tmp / "trial.nkat"), self.opts.backend, gamma,
                                   seq_len=OVERHEAD_SEQ_LEN, iterations=OVERHEAD_ITERATIONS, repeats=3,
                                   threads=self.opts.threads)
            self._overhead[key] = float(res["overhead_percentage"])
        return self._overhead[key]

    def _close_runtime(self) -> None:
        if self._rt is not None:
            self._rt.close()
            self._rt = None
            self._key = None

    def close(self) -> None:
        self._close_runtime()
        shutil.rmtree(self._tmp, ignore_errors=True)


def remove_stale_scratch(output_dir: str | os.PathLike) -> None:
    """Delete scratch directories in `output_dir` left by workers that are gone."""
    pattern = re.compile(rf"^{re.escape(SCRATCH_PREFIX)}(\d+)-")
    with contextlib.suppress(OSError):
        for entry in os.scandir(output_dir):
            m = pattern.match(entry.name)
            if m and entry.is_dir(follow_symlinks=False) and not pid_alive(int(m.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)


# -- storage --------------------------------------------------------------------------------------
def default_storage_url(output_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / DB_NAME}"


redact = redact_url  # the URL without its passwords (for messages and outputs)


def _driver_url(url: str) -> str:
    """postgresql:// with only psycopg 3 installed -> postgresql+psycopg:// (SQLAlchemy's default
    driver for postgresql:// is psycopg2)."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(url: str):
    """An Optuna RDB storage with heartbeats; one-line errors for unreachable URLs."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith(("postgresql", "postgres", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        engine_kwargs["pool_pre_ping"] = True
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    _driver_url(url), engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=GRACE_PERIOD,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                )
        except ImportError as exc:
            raise UserError(f"--storage {redact(url)}: the database driver is missing ({scrub(str(exc), url)}); "
                            "for PostgreSQL: pip install 'psycopg[binary]'") from None
        except Exception as exc:  # SQLAlchemy's OperationalError, ArgumentError, ...
            text = str(exc)
            if attempt < 3 and any(s in text for s in _CREATE_RACE):
                time.sleep(1.0 + attempt)  # another worker is creating the tables right now
                continue
            first = scrub(text.strip().splitlines()[0], url) if text.strip() else type(exc).__name__
            raise UserError(f"--storage {redact(url)}: cannot open the study storage ({first})") from None


# What two workers creating the same fresh storage's tables at once run into.
_CREATE_RACE = ("already exists", "duplicate key", "UniqueViolation", "database is locked")


# -- workers --------------------------------------------------------------------------------------
def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    return "noboot"


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if not Path("/proc").is_dir():  # no procfs: fall back to signal 0
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                return "?"
            return "?"
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def worker_id() -> str:
    """host/boot:pid:start - identifies this process, even across pid reuse."""
    return f"{socket.gethostname()}/{_boot_id()}:{os.getpid()}:{_start_time(os.getpid())}"


def _is_dead_local(worker: str) -> bool:
    """True when `worker` ran on this machine (same boot) and that process is gone."""
    try:
        host_boot, pid, start = worker.rsplit(":", 2)
    except ValueError:
        return False
    if host_boot != f"{socket.gethostname()}/{_boot_id()}":
        return False
    now = _start_time(int(pid))
    return now is None or (now != "?" and now != start)


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


# -- the study ------------------------------------------------------------------------------------
class Optimizer:
    """One worker of a study: validate, open/resume the study, run trials, write the outputs."""

    def __init__(self, opts: OptimizeOptions):
        self.opts = opts
        self.n_trials = trial_budget(opts.mode, opts.trials)
        self.worker = worker_id()
        self.started = time.perf_counter()
        self._validate()

    # -- inputs (all checked before anything is written) -----------------------------------------
    def _validate(self) -> None:
        from ..measure.ppl import read_text

        o = self.opts
        if o.backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {o.backend!r}")
        if o.chunks is None or o.chunks < 1:
            raise UserError(f"--chunks must be at least 1, not {o.chunks}")
        if o.final_chunks is None or o.final_chunks < 0:
            raise UserError(f"--final-chunks must be 0 (off) or more, not {o.final_chunks}")
        if o.target_rank is not None and o.target_rank <= 0:
            raise UserError(f"--target-rank must be positive, not {o.target_rank}")
        if o.max_kld is not None and not (np.isfinite(o.max_kld) and o.max_kld > 0):
            raise UserError(f"--max-kld must be a positive number, not {o.max_kld}")
        if o.max_kld is not None and not o.reference:
            raise UserError("--max-kld needs --reference (KL-divergence is measured against it)")
        if o.max_overhead is not None and not np.isfinite(o.max_overhead):
            raise UserError(f"--max-overhead must be a number (percent), not {o.max_overhead}")
        for flag, path in (("--imatrix", o.imatrix), ("--covariance", o.covariance)):
            if path and not o.reference:
                raise UserError(f"{flag} is used by a residual source, which needs --reference")
            if path and not Path(path).is_file():
                raise UserError(f"{flag} file not found: {path}")
        if not o.study_name or not o.study_name.strip():
            raise UserError("--study-name must not be empty")
        check_ctx(o.ctx)

        # Where results go, and the storage, are checked before any model is read or loaded.
        out = Path(o.output_dir)
        check_output_dir(out, [o.model, o.reference, o.imatrix, o.text])
        self.storage_url = o.storage or default_storage_url(out)
        self.storage = open_storage(self.storage_url) if o.storage else None
        self._check_output_dir()

        self.model = ModelFile(o.model)
        if self.model.file_type == "adapter":
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
            if self.reference.file_type == "adapter":
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
        self.scorer = ChunkScorer(o, self.text, self.base_bytes)  # loads, tokenizes, counts chunks

    def setup(self) -> dict:
        """What must be equal for trials to be comparable (checked when a study is resumed)."""
        o = self.opts
        return {
            "model": {"name": self.model.name, "file_size": self.model.file_size,
                      "fingerprint": self.model.fingerprint},
            "reference": ({"name": self.reference.name, "file_size": self.reference.file_size,
                           "fingerprint": self.reference.fingerprint} if self.reference else None),
            "imatrix": file_digest(o.imatrix) if o.imatrix else None,
            "covariance": file_digest(o.covariance) if o.covariance else None,
            "text": {"name": Path(o.text).name, "sha256": file_digest(o.text)},
            "ctx": o.ctx, "chunks": o.chunks, "backend": o.backend, "flash_attn": bool(o.flash_attn),
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

    # -- trials --------------------------------------------------------------------------------------
    def _fail_dead_local(self) -> list[int]:
        """Fail and re-queue RUNNING trials whose worker process on this machine is gone."""
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.trial import TrialState

        failed = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker")
            if t.user_attrs.get("worker_trial") != t.number or not worker or worker == self.worker:
                continue
            if not _is_dead_local(worker):
                continue
            try:
                self.storage.set_trial_user_attr(t._trial_id, "fail_reason", f"worker {worker} died")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # someone else got there first
            frozen = self.study.get_trials(deepcopy=True)[t.number]
            with warnings.catch_warnings():  # the callback class is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(self.study, frozen)
            failed.append(t.number)
        return failed

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
        figures = self.runner.evaluate(config)
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
                self._fail_dead_local()
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
                with warnings.catch_warnings():
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
        from . import outputs

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
        self.scorer.prepare()
        self.runner = TrialRunner(o, self.factors, self.scorer)
        writer = outputs.OutputWriter(self)
        try:
            ran = self.run_trials(on_trial=writer.write_progress)
        finally:
            self.runner.close()
        return writer.finish(ran)

    # -- used by the outputs ---------------------------------------------------------------------
    def final_evaluation(self, nkat_path: Path) -> dict | None:
        """Best theta, baseline (same model at gamma 0) and reference on --final-chunks chunks."""
        from ..measure.evaluate import evaluate

        o = self.opts
        if not o.final_chunks:
            return None
        n = min(o.final_chunks, self.scorer.available_chunks)
        rt_kwargs = dict(n_ctx=o.ctx, n_threads=o.threads, flash_attn=o.flash_attn)
        rt = Runtime(o.model, nkat_path, backend=o.backend, **rt_kwargs)
        ref = Runtime(o.reference, **rt_kwargs) if o.reference else None
        given = Runtime(o.model, o.given_theta, backend=o.backend, **rt_kwargs) if o.given_theta else None
        candidates = {"baseline": (rt, 0.0), "best": (rt, rt.file_gamma)} | ({"given": given} if given else {})
        try:
            results = evaluate(candidates, self.scorer.tokens, o.ctx, n, reference=ref, quiet=o.quiet)
        finally:
            for runtime in (rt, ref, given):
                if runtime is not None:
                    runtime.close()
        theta_bytes = int(rt.theta_meta["theta_bytes"])
        best, base = results["best"], results["baseline"]
        ref_res = results.get("reference")
        out = {"chunks": n, "ctx": o.ctx}
        out["best"] = {k: best.get(k) for k in ("ppl", "ppl_err", "kld_mean", "kld_p99", "top1_agreement")}
        out["best"]["tpe"] = tpe(best["ppl"], theta_bytes, self.base_bytes)
        out["best"]["bytes"] = self.base_bytes + theta_bytes
        out["best"]["gap_recovered"] = gap_recovered(base["ppl"], best["ppl"], ref_res["ppl"]) if ref_res else None
        out["baseline"] = {k: base.get(k) for k in ("ppl", "ppl_err", "kld_mean", "kld_p99", "top1_agreement")}
        out["baseline"]["tpe"] = tpe(base["ppl"])
        out["baseline"]["bytes"] = self.base_bytes
        if ref_res:
            out["reference"] = {"ppl": ref_res["ppl"], "ppl_err": ref_res["ppl_err"]}
        if given is not None:
            given_bytes = int(given.theta_meta["theta_bytes"])
            out["given"] = {k: results["given"].get(k) for k in ("ppl", "ppl_err", "kld_mean", "kld_p99")}
            out["given"] |= {"theta": str(o.given_theta), "tpe": tpe(results["given"]["ppl"], given_bytes, self.base_bytes),
                             "bytes": self.base_bytes + given_bytes}
        out["beats_baseline"] = out["best"]["tpe"] > out["baseline"]["tpe"]
        out["wall_seconds"] = results["_wall_seconds"]
        return out


def search_space_note(space: SearchSpace) -> str:
    """What a study without --reference can search, and what that source was measured to do."""
    low, high = space.gamma["weight"]
    return (f"no --reference: only the weight source is searchable (SVD of W itself, gamma {low:g}..{high:g}); "
            f"{theta_math.WEIGHT_SOURCE_EFFECT}. Pass --reference REF.gguf to search the residual sources")


def run_optimize(opts: OptimizeOptions) -> dict:
    return Optimizer(opts).run()
