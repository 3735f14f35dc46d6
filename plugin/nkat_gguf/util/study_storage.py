"""Where a study lives, and what happens to the trials of a worker that died.

Storage: an SQLite file in the output dir by default, any Optuna RDB URL otherwise (PostgreSQL
lets several machines share one study). Passwords never leave this module unredacted.

Dead workers. Optuna 5.0 offers two mechanisms, neither enough on its own:
  * heartbeats (RDBStorage heartbeat_interval / grace_period + RetryHeartbeatStaleTrialCallback)
    fail and re-queue a RUNNING trial only once its heartbeat is older than the grace period,
    and only when some worker calls fail_stale_trials (Study.optimize does, when a trial starts).
    A worker killed with kill -9 and restarted at once would find its own trial in flight still
    RUNNING, holding one of the study's slots for a whole grace period. They stay on: they are
    the only way to notice a worker on another machine is gone.
  * MaxTrialsCallback(n, states=(COMPLETE,)) stops a worker after a trial once n trials are
    COMPLETE; it is checked after a trial ends, so workers that start the last slots at the same
    time all run them and the study overshoots its budget (Optimizer._objective counts RUNNING
    trials ahead of its own instead).
So a RUNNING trial whose worker ran on this machine (same boot) and whose process is gone is
failed and re-queued at once (fail_dead_local); other machines' trials wait for the heartbeat.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from pathlib import Path

from ..errors import UserError
from .redaction import ambiguous_userinfo, redact_url, scrub

DB_NAME = "optuna_study.db"
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a running trial without a heartbeat for this long is failed and re-queued
MAX_RETRY = 2


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
    if ambiguous_userinfo(url) is not None:  # before any driver sees it: it would quote the pieces
        raise UserError(f"--storage {redact(url)}: the user name or password holds an unescaped '@'; "
                        "percent-encode it (@ as %40, : as %3A, / as %2F)")
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


def fail_dead_local(study, storage, me: str) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker process on this machine is gone (not `me`)."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if t.user_attrs.get("worker_trial") != t.number or not worker or worker == me:
            continue
        if not _is_dead_local(worker):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"worker {worker} died")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # someone else got there first
        frozen = study.get_trials(deepcopy=True)[t.number]
        with warnings.catch_warnings():  # the callback class is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, frozen)
        failed.append(t.number)
    return failed
