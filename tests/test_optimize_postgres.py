"""Two nkat optimize workers share one study in a real PostgreSQL server started by the test.

The server is Debian's `postgresql` package (binaries in /usr/lib/postgresql/<version>/bin): a
throwaway cluster in a temporary directory, listening on 127.0.0.1 at a free port, run as the
`postgres` user when the tests run as root (postgres refuses to run as root). Skipped with the
reason when the binaries or the psycopg driver are missing.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "plugin"), OPENBLAS_NUM_THREADS="1")
N_TRIALS = 4


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install 'psycopg[binary]')")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="nkat-pg-"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *map(str, cmd)], check=True, capture_output=True, text=True,
                                      timeout=120)
    try:
        run(pg_bin / "initdb", "-D", data, "-A", "trust", "-U", "nkat", "-E", "UTF8", "--no-sync")
        run(pg_bin / "pg_ctl", "-D", data, "-l", base / "server.log", "-w", "-t", "60", "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except subprocess.CalledProcessError as exc:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr}\n{log}")
    try:
        yield f"postgresql://nkat@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_share_one_study(postgres_url, work, base_model, reference_model, short_text):
    import optuna

    name = "two-workers"
    workers = []
    for i in range(2):
        out = work / f"pg-worker-{i}"
        cmd = [sys.executable, "-m", "nkat_gguf.cli", "optimize", "--model", str(base_model),
               "--reference", str(reference_model), "--text", str(short_text), "--output-dir", str(out),
               "--storage", postgres_url, "--study-name", name, "--mode", "custom", "--trials", str(N_TRIALS),
               "--ctx", "64", "--chunks", "1", "--threads", "1", "--target-rank", "8", "--final-chunks", "0",
               "--seed", str(10 + i), "--json"]
        # one thread each (two workers on two cores); the shortest scoring: no quality is compared here
        workers.append((out, subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True)))
    summaries = []
    for out, proc in workers:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr
        summaries.append(json.loads(stdout))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == N_TRIALS  # none lost, none extra
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING", "FAIL")]
    # Anything else is a never-run surplus trial from a budget race, marked as such.
    assert all(t.user_attrs.get("surplus") for t in trials if t.state.name == "PRUNED")
    # Every complete trial was run by one of the two workers, and their counts add up.
    by_worker = {s["worker"]: s["trials_completed_by_this_worker"] for s in summaries}
    assert len(by_worker) == 2
    assert sum(by_worker.values()) == N_TRIALS
    assert {t.user_attrs["worker"] for t in complete} <= set(by_worker)
    # Both workers' outputs show the whole study.
    for out, _ in workers:
        history = json.loads((out / "optimization_history.json").read_text())
        assert [r["number"] for r in history if r["state"] == "COMPLETE"] == sorted(t.number for t in complete)
        assert json.loads((out / "optuna_study.json").read_text())["storage"] == postgres_url
    print("trials per worker:", by_worker)
