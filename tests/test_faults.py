"""Bad input and faults (issue 13): nothing a user types may destroy a file, leak a secret,
orphan a server or pass garbage as a result. Each test reproduces one defect found by an audit."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, make_gguf
from test_bad_input import assert_user_error, nkat

from nkat_gguf.errors import UserError

# The tiny test models have no reference and cannot be scored: the weight source by name, no check.
TINY = ("--source", "weight", "--check-chunks", "0")

rng = np.random.default_rng(13)


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A tiny llama-architecture GGUF (gguf-py reads it; llama.cpp cannot load it: no vocab)."""
    return make_gguf(tmp_path / "tiny.gguf", {
        "blk.0.attn_q.weight": rng.standard_normal((64, 64)),
        "blk.0.ffn_up.weight": rng.standard_normal((96, 64)),
    })


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- data loss

@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_convert_output_that_is_its_input_is_refused(tmp_path, tiny, how):
    before = tiny.read_bytes()
    out = {"same path": tiny, "symlink": tmp_path / "link.gguf", "hard link": tmp_path / "hard.gguf"}[how]
    if how == "symlink":
        out.symlink_to(tiny)
    elif how == "hard link":
        os.link(tiny, out)
    assert_user_error(nkat("convert", "--input", tiny, "--theta-rank", "2", *TINY, "--output", out), "is the input")
    assert tiny.read_bytes() == before


def test_convert_output_that_is_the_reference_is_refused(tmp_path, tiny):
    ref = make_gguf(tmp_path / "ref.gguf", {"blk.0.attn_q.weight": rng.standard_normal((64, 64)),
                                             "blk.0.ffn_up.weight": rng.standard_normal((96, 64))})
    before = ref.read_bytes()
    assert_user_error(nkat("convert", "--input", tiny, "--reference", ref, "--theta-rank", "2", *TINY, "--output", ref),
                      "is the input", "ref.gguf")
    assert ref.read_bytes() == before


def test_quantize_in_place_is_refused(tmp_path, reference_model):
    model = tmp_path / "x.gguf"
    os.link(reference_model, model) if os.stat(reference_model).st_dev == os.stat(tmp_path).st_dev \
        else model.write_bytes(reference_model.read_bytes())
    size = model.stat().st_size
    assert_user_error(nkat("quantize", "--input", model, "--output", model, "--type", "q4_0"), "is the input")
    assert model.stat().st_size == size
    assert not list(tmp_path.glob(".*.partial"))


def test_output_that_is_not_a_regular_file_is_never_replaced(tmp_path, tiny):
    fifo = tmp_path / "pipe.nkat"          # stands in for a device node such as /dev/null
    os.mkfifo(fifo)
    assert_user_error(nkat("convert", "--input", tiny, "--theta-rank", "2", *TINY, "--output", fifo), "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    from nkat_gguf.util.output_paths import check_output_path

    with pytest.raises(UserError, match="not a regular file"):
        check_output_path("/dev/null")       # refused before anything could touch it


def test_output_that_is_a_directory_is_refused_before_any_work(tmp_path):
    truncated = tmp_path / "cut.gguf"         # reading it would fail: the output check must come first
    truncated.write_bytes(b"GGUF" + b"\0" * 20)
    outdir = tmp_path / "out.nkat"
    outdir.mkdir()
    assert_user_error(nkat("convert", "--input", truncated, "--theta-rank", "2", *TINY, "--output", outdir), "is a directory")
    missing = tmp_path / "no" / "such" / "o.nkat"
    assert_user_error(nkat("convert", "--input", truncated, "--theta-rank", "2", *TINY, "--output", missing),
                      "output directory does not exist")


def test_replaced_output_keeps_its_mode_and_new_ones_follow_the_umask(tmp_path, tiny):
    existing = tmp_path / "shared.nkat"
    existing.write_text("old")
    os.chmod(existing, 0o640)
    assert nkat("convert", "--input", tiny, "--theta-rank", "2", *TINY, "--output", existing, "--quiet").returncode == 0
    assert mode_of(existing) == 0o640
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
    for umask, expected in ((0o022, 0o644), (0o027, 0o640)):
        out = tmp_path / f"new-{umask:o}.nkat"
        done = subprocess.run([sys.executable, "-c", f"import os, sys; os.umask({umask}); "
                               "from nkat_gguf.cli import main; sys.exit(main(sys.argv[1:]))",
                               "convert", "--input", str(tiny), "--theta-rank", "2", *TINY, "--output", str(out), "--quiet"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert mode_of(out) == expected


def test_text_outputs_such_as_kcpps_follow_the_umask(tmp_path):
    from nkat_gguf.util.atomic import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "model.kcpps", "{}")   # kobold_config writes .kcpps through this
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "model.kcpps") == 0o644


# ---------------------------------------------------------------- partial files and scratch

def test_stale_partials_of_dead_writers_are_removed_on_the_next_run(tmp_path, tiny):
    out = tmp_path / "o.nkat"
    stale = tmp_path / f".o.nkat.{dead_pid()}.k3j_x9.partial"
    live = tmp_path / f".o.nkat.{os.getpid()}.abc123.partial"    # a writer that is still running
    foreign = tmp_path / ".o.nkat.notapid.partial"                 # not our pattern: left alone
    for p in (stale, live, foreign):
        p.write_bytes(b"x" * 100)
    assert nkat("convert", "--input", tiny, "--theta-rank", "2", *TINY, "--output", out, "--quiet").returncode == 0
    assert out.is_file() and not stale.exists() and live.exists() and foreign.exists()


def test_sigterm_during_a_write_leaves_no_partial(tmp_path, reference_model):
    out = tmp_path / "q.gguf"
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
    proc = subprocess.Popen([sys.executable, "-m", "nkat_gguf.cli", "quantize", "--input", str(reference_model),
                             "--output", str(out), "--type", "q4_0", "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".q.gguf.*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "quantize ended before a partial file was seen"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_optimize_scratch_lives_in_the_output_dir_and_stale_scratch_is_removed(tmp_path):
    from nkat_gguf.optimize.trials import SCRATCH_PREFIX, TrialRunner, remove_stale_scratch

    stale = tmp_path / f"{SCRATCH_PREFIX}{dead_pid()}-zz"
    stale.mkdir()
    (stale / "trial.nkat").write_bytes(b"x")
    remove_stale_scratch(tmp_path)
    assert not stale.exists()
    runner = TrialRunner(SimpleNamespace(output_dir=str(tmp_path)), factors=None, scorer=None)
    try:
        assert runner.scratch.parent == tmp_path
        remove_stale_scratch(tmp_path)              # its writer (this process) is alive: kept
        assert runner.scratch.is_dir()
    finally:
        runner.close()
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- secrets

SECRET = "Pa/Secret9"


@pytest.mark.parametrize("url,password,visible", [
    (f"postgresql://u:{SECRET}@127.0.0.1:1/db", SECRET, "postgresql://u:***@127.0.0.1:1/db"),
    ("postgresql://u@host/db?password=Pa%2FSecret9", SECRET, "postgresql://u@host/db?password=***"),
    ("postgresql://u@host/db?sslmode=require&password=Secret9", "Secret9",
     "postgresql://u@host/db?password=***&sslmode=require"),
    ("postgresql://:onlypwSecret9@h/db", "onlypwSecret9", "postgresql://:***@h/db"),
    ("postgresql+psycopg://u:p%40ss:Secret9@h:5432/db", "p@ss:Secret9", "postgresql+psycopg://u:***@h:5432/db"),
    ("mysql://u:Secret9#x@h/db", "Secret9#x", "mysql://u:***@h/db"),
    ("sqlite:////tmp/x/optuna_study.db", None, "sqlite:////tmp/x/optuna_study.db"),
])
def test_every_password_form_is_redacted(url, password, visible):
    from nkat_gguf.util.redaction import redact_url, scrub

    shown = redact_url(url)
    assert "Secret9" not in shown
    assert shown == visible
    message = f"could not connect to {url}: password {password!r} rejected for user u"
    assert "Secret9" not in scrub(message, url)


def test_optimize_storage_password_never_printed_and_storage_checked_before_models(tmp_path, short_text):
    truncated = tmp_path / "cut.gguf"          # the model is read after the storage: its error must not come first
    truncated.write_bytes(b"GGUF" + b"\0" * 20)
    done = nkat("optimize", "--model", truncated, "--text", short_text, "--output-dir", tmp_path / "study",
                "--storage", f"postgresql://u:{SECRET}@127.0.0.1:1/db", "--quiet")
    assert_user_error(done, "--storage", "postgresql://u:***@127.0.0.1:1/db")
    assert "Secret9" not in done.stderr + done.stdout


def test_reproducing_command_and_summary_hide_the_password(tmp_path):
    from nkat_gguf.optimize.options import OptimizeOptions
    from nkat_gguf.commands.rerun import study_command

    url = "postgresql://u@db.example/optuna?password=Secret9"
    opts = OptimizeOptions(model="m.gguf", output_dir=str(tmp_path), text="t.txt", storage=url)
    command = " ".join(study_command(opts, 3))
    assert "Secret9" not in command and "password=***" in command


# ---------------------------------------------------------------- processes

def run_until(proc, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def kill_listeners(port: int) -> None:
    """Clean up after a failure: stop any llama_cpp.server we started on `port`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"llama_cpp.server" in argv and str(port).encode() in argv:
            os.kill(int(cmdline.parent.name), signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_to_nkat_kobold_stops_the_server_it_started(tmp_path, sig):
    from test_kobold import make_theta

    from nkat_gguf.integrations.kobold import server as kobold_server
    from nkat_gguf.formats.defaults import default_model_path

    if kobold_server.server_extras_missing():
        pytest.skip(f"llama-cpp-python server extras missing: {kobold_server.SERVER_EXTRAS_PIP}")
    theta = make_theta(tmp_path / "t.nkat", default_model_path())
    port = kobold_server.free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))
    proc = subprocess.Popen([sys.executable, "-m", "nkat_gguf.cli", "kobold", "--theta", str(theta),
                             "--backend", "llama-cpp-python", "--launch", "--port", str(port),
                             "--context-size", "256", "--max-tokens", "2", "--timeout", "120"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run_until(proc, lambda: kobold_server.port_in_use("127.0.0.1", port), 120)
        time.sleep(1.0)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
        deadline = time.monotonic() + 30
        while kobold_server.port_in_use("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not kobold_server.port_in_use("127.0.0.1", port), "the server outlived nkat"
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_listeners(port)


def test_failed_startup_log_is_kept_where_the_message_says(tmp_path, monkeypatch, capsys):
    from test_kobold import make_launcher, make_theta

    from nkat_gguf.integrations.kobold import server as kobold_server
    from nkat_gguf.cli import main
    from nkat_gguf.formats.defaults import default_model_path

    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    models = tmp_path / "models"
    models.mkdir()
    make_theta(models / "t.nkat", default_model_path())
    launcher = make_launcher(tmp_path / "kc", "old")       # exits with status 1 during start-up
    assert main(["kobold", "--koboldcpp", str(launcher), "--models-dir", str(models), "--launch", "--smoke-only",
                 "--port", str(kobold_server.free_port()), "--timeout", "60", "--json"]) == 2
    err = capsys.readouterr().err
    log = Path(err.split("(log: ", 1)[1].split(")", 1)[0])
    assert log.is_file() and log.read_text().strip()
    assert not list(tmp_path.glob("nkat-kobold-*"))          # the private config directory is gone


def test_standalone_scripts_name_themselves():
    for script, command in (("backend_selector.py", "kobold"), ("setup_nkat_kobold_integration.py", "doctor")):
        done = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: {script} "), done.stdout[:200]


def test_reviving_trials_of_a_dead_worker_raises_no_experimental_warning(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from nkat_gguf.util.study_storage import fail_dead_local, open_storage, worker_id

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    trial = study.ask()
    trial.suggest_int("rank", 8, 64, step=8)
    dead_worker = worker_id().rsplit(":", 2)[0] + f":{dead_pid()}:1"
    trial.set_user_attr("worker", dead_worker)
    trial.set_user_attr("worker_trial", trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fail_dead_local(study, storage, worker_id()) == [trial.number]
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.WAITING]       # failed and re-queued


# ---------------------------------------------------------------- garbage passed as a result

@pytest.mark.parametrize("flags,words", [
    (("--ctx", "1"), "--ctx must be at least"),
    (("--ctx", "2"), "--ctx must be at least"),
    (("--chunks", "0"), "--chunks must be at least 1"),
    (("--chunks", "-1"), "--chunks must be at least 1"),
])
def test_ppl_ctx_and_chunks_limits(reference_model, short_text, flags, words):
    assert_user_error(nkat("ppl", "--model", reference_model, "--text", short_text, *flags), words)


def small_theta(path: Path, model: Path, names: list[str], rank: int = 4, shape=None) -> Path:
    """A theta for `model` (its identity recorded, so the fingerprint check passes) on `names`."""
    from nkat_gguf.formats.gguf_io import ModelFile
    from nkat_gguf.formats.nkat_format import NkatMeta, ThetaFactors, write_nkat

    m = ModelFile(model)
    factors = []
    for name in names:
        n_out, n_in = shape or m.shape(name)
        factors.append(ThetaFactors(name, rng.standard_normal((rank, n_in)).astype(np.float32) * 0.01,
                                    rng.standard_normal((n_out, rank)).astype(np.float32) * 0.01))
    write_nkat(path, m.architecture, factors, NkatMeta(theta_rank=rank, theta_gamma=2.0, source="residual",
                                                       structure="general", theta_type="f32", base=m.identity()))
    return path


def test_nan_in_theta_is_an_error_not_a_ppl(tmp_path, base_model, short_text):
    from gguf import GGUFReader

    theta = small_theta(tmp_path / "nan.nkat", base_model, ["blk.0.attn_q.weight", "blk.3.ffn_down.weight"])
    reader = GGUFReader(theta, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight.lora_b")
    tensor.data[0, 0] = np.nan
    reader.data.flush()
    del reader
    done = nkat("ppl", "--model", base_model, "--theta", theta, "--text", short_text, "--ctx", "128", "--chunks", "2")
    assert_user_error(done, "non-finite", "nan.nkat")
    assert "nan" not in done.stdout.lower()
    assert_user_error(nkat("ppl", "--model", base_model, "--theta", theta, "--backend", "shim", "--text", short_text,
                           "--ctx", "128", "--chunks", "2"), "NaN or Inf", "blk.0.attn_q.weight")


@pytest.mark.parametrize("backend", ["shim", "lora"])
def test_theta_for_weights_the_model_lacks_is_refused(tmp_path, base_model, short_text, backend):
    theta = small_theta(tmp_path / "other.nkat", base_model, ["blk.0.attn_q.weight", "blk.99.attn_q.weight"],
                        shape=(576, 576))
    assert_user_error(nkat("ppl", "--model", base_model, "--theta", theta, "--backend", backend,
                           "--text", short_text, "--ctx", "128", "--chunks", "2"),
                      "match no weight", "blk.99.attn_q.weight")


def test_shim_reports_tensors_it_never_applied(base_model, theta_r8):
    from nkat_gguf.runtime.native import ShimHook  # noqa: F401  (skips below when the shim is not built)
    from nkat_gguf.runtime.engine import Runtime

    tokens = np.arange(1, 33, dtype=np.int32)
    with Runtime(base_model, theta_r8, backend="shim", n_ctx=64) as rt:
        registered = set(rt._hook.names())
        rt._hook.disable()                       # nothing applied: every tensor reported
        rt.decode(tokens, logits_from=31)
        assert set(rt.never_applied()) == registered
    with Runtime(base_model, theta_r8, backend="shim", n_ctx=64) as rt:
        rt.decode(tokens, logits_from=31)
        assert rt.never_applied() == []


# ---------------------------------------------------------------- one line instead of a traceback

def patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


def test_invalid_utf8_in_gguf_strings(tmp_path, tiny):
    patch_bytes(tiny, b"tiny test model", b"tiny\xfftest model")
    assert_user_error(nkat("convert", "--input", tiny, "--theta-rank", "2", *TINY, "--output", tmp_path / "o.nkat"),
                      "general.name", "UTF-8")
    assert not (tmp_path / "o.nkat").exists()
    good = make_gguf(tmp_path / "good.gguf", {"blk.0.attn_q.weight": rng.standard_normal((64, 64))})
    theta = tmp_path / "t.nkat"
    assert nkat("convert", "--input", good, "--theta-rank", "2", *TINY, "--output", theta, "--quiet").returncode == 0
    patch_bytes(theta, b"tiny test model", b"tiny\xfftest model")   # the .nkat's nkat.base.name
    assert_user_error(nkat("inspect", theta), "nkat.base.name", "not valid UTF-8")


def run_in_process(argv) -> tuple[int, str]:
    from nkat_gguf.cli import main

    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def test_gguf_header_fuzzer(tmp_path):
    """Seeded mutations of a .nkat's header and of a model's: every outcome is a parse or one line, status 2."""
    model = make_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": rng.standard_normal((32, 32)),
                                             "blk.0.ffn_up.weight": rng.standard_normal((64, 32))})
    theta = tmp_path / "t.nkat"
    assert run_in_process(["convert", "--input", str(model), "--theta-rank", "2", *TINY, "--output", str(theta),
                           "--theta-type", "f32", "--quiet"])[0] == 0
    fuzz = np.random.default_rng(1300)
    outcomes = {0: 0, 2: 0}
    for original, command in ((theta, ["inspect"]), (model, ["convert", "--theta-rank", "2", *TINY, "--quiet", "--input"])):
        data = original.read_bytes()
        header = min(len(data), 1200)
        for i in range(150):
            mutated = bytearray(data)
            for _ in range(int(fuzz.integers(1, 4))):
                pos = int(fuzz.integers(0, header))
                mutated[pos] = int(fuzz.choice([0x00, 0xff, 0x7f, 0x80, fuzz.integers(0, 256)]))
            case = tmp_path / f"case{i}{original.suffix}"
            case.write_bytes(bytes(mutated))
            argv = [*command, str(case)] + (["--output", str(tmp_path / "out.nkat")] if command[0] == "convert" else [])
            code, err = run_in_process(argv)
            assert code in (0, 2), (i, original.name, err)
            if code == 2:
                lines = [l for l in err.splitlines() if l.strip()]
                assert len(lines) == 1 and "Traceback" not in err, (i, original.name, err)
            outcomes[code] += 1
            case.unlink()
    assert outcomes[2] > 30 and outcomes[0] > 0, outcomes


# ---------------------------------------------------------------- checks before work

def test_theta_for_another_model_is_refused_before_llama_cpp_loads(tmp_path, tiny, theta_r8, short_text):
    # llama.cpp cannot load `tiny` (no vocabulary): the theta check must come first.
    assert_user_error(nkat("ppl", "--model", tiny, "--theta", theta_r8, "--text", short_text, "--ctx", "128"),
                      "made for base model")


def test_llama_cpp_refusal_shows_its_reason(tmp_path, base_model, short_text):
    from nkat_gguf.runtime.engine import Runtime

    theta = small_theta(tmp_path / "arch.nkat", base_model, ["blk.0.attn_q.weight"])
    patch_bytes(theta, b"general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00llama",
                b"general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00gemma")
    with pytest.raises(UserError, match=r"llama.cpp refused the adapter: .*arch"):
        Runtime(base_model, theta, backend="lora", n_ctx=64)
