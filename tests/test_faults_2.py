"""Bad input and faults, second pass (issue 24): a password with an unescaped '@', a launcher killed
with SIGKILL, frontier's and attribute's work directory and score cache, non-positive timeouts,
signals during a long llama.cpp call and during an optimize trial, the vision side's commands.
Each test reproduces one case of the audit."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_bad_input import assert_user_error, nkat

ENV = dict(os.environ, PYTHONPATH=str(REPO / "plugin"))


def popen_nkat(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nkat_gguf.cli", *map(str, args)], env=kwargs.pop("env", ENV),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


# ---------------------------------------------------------------- 1. an unescaped '@' in a password

AMBIGUOUS = [
    # (URL, what follows the last '@')
    ("postgresql://u:Pa@Secret9@127.0.0.1:1/db", "127.0.0.1:1/db"),
    ("postgresql+psycopg://us@er:Secret9@127.0.0.1:1/db", "127.0.0.1:1/db"),
    ("postgresql://u:a@b@Secret9@127.0.0.1:1/db?sslmode=disable", "127.0.0.1:1/db?sslmode=disable"),
    ("mysql://u:Pa@Secret9@127.0.0.1:1/db", "127.0.0.1:1/db"),
]


@pytest.mark.parametrize("url,tail", AMBIGUOUS)
def test_nothing_before_the_last_at_is_ever_shown(url, tail):
    from nkat_gguf.util.redaction import redact_url, scrub

    scheme = url.split("://")[0]
    assert redact_url(url) == f"{scheme}://***@{tail}"
    userinfo = url.split("://", 1)[1].rsplit("@", 1)[0]
    password = userinfo.split(":", 1)[1]
    driver = f"failed to resolve host '{password.rsplit('@', 1)[-1]}@127.0.0.1' for {url} (password {password})"
    assert "Secret9" not in scrub(driver, url)


@pytest.mark.parametrize("url,tail", AMBIGUOUS[:2])
def test_optimize_refuses_an_ambiguous_storage_url_in_one_line(tmp_path, url, tail):
    cut = tmp_path / "cut.gguf"            # never read: the storage is checked first
    cut.write_bytes(b"GGUF" + b"\0" * 20)
    done = nkat("optimize", "--model", cut, "--output-dir", tmp_path / "o", "--storage", url,
                "--mode", "custom", "--trials", "1")
    assert_user_error(done, "percent-encode", f"://***@{tail}")
    assert "Secret9" not in done.stdout + done.stderr
    assert not (tmp_path / "o").exists()


def test_vit_optimize_storage_passwords(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from nkat_gguf.cli import main

    for url, words in (("postgresql://u:Pa@Secret9@127.0.0.1:1/db", ["percent-encode", "://***@127.0.0.1:1/db"]),
                       ("postgresql://u:Pa/Secret9@127.0.0.1:1/db", ["cannot open", "u:***@127.0.0.1:1/db"])):
        out = tmp_path / "vo"
        status = main(["vit", "optimize", "--output-dir", str(out), "--storage", url, "--datasets", "digits",
                       "--trials", "1", "--quiet"])
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1, captured.err
        assert all(w in lines[0] for w in words), lines[0]
        assert "Secret9" not in captured.out + captured.err
        assert not out.exists()                 # nothing made before the storage was refused


# ---------------------------------------------------------------- 2. a launcher killed with SIGKILL

def llama_server_pid(port: int) -> int | None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"llama_cpp.server" in argv and str(port).encode() in argv:
            return int(cmdline.parent.name)
    return None


def test_killed_nkat_kobold_takes_its_llama_server_along(tmp_path):
    from test_kobold import make_theta

    from nkat_gguf.formats.defaults import default_model_path
    from nkat_gguf.integrations.kobold import server as kobold_server

    if kobold_server.server_extras_missing():
        pytest.skip(f"llama-cpp-python server extras missing: {kobold_server.SERVER_EXTRAS_PIP}")
    theta = make_theta(tmp_path / "t.nkat", default_model_path())
    port = kobold_server.free_port()
    proc = popen_nkat("kobold", "--theta", theta, "--backend", "llama-cpp-python", "--launch", "--port", port,
                      "--context-size", "256", "--max-tokens", "2", "--timeout", "120")
    server = None
    try:
        deadline = time.monotonic() + 120
        while not kobold_server.port_in_use("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        server = llama_server_pid(port)
        assert server is not None and alive(server)
        proc.kill()                                  # kill -9: no clean-up of ours can run
        proc.wait()
        assert wait_gone(server), "llama_cpp.server outlived nkat kobold killed with SIGKILL"
    finally:
        if proc.poll() is None:
            proc.kill()
        if server is not None and alive(server):
            os.kill(server, signal.SIGKILL)


def test_koboldcpp_started_by_the_selector_dies_with_it(tmp_path):
    """start_koboldcpp's process (a stand-in command that just waits) outlives no SIGKILL of its parent."""
    from nkat_gguf.integrations.kobold import server as kobold_server

    port = kobold_server.free_port()
    parent = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from nkat_gguf.integrations.kobold.server import start_koboldcpp\n"
        "s = start_koboldcpp([sys.executable, '-c', 'import time; time.sleep(300)', 'koboldcpp'], "
        f"Path({str(tmp_path / 'x.kcpps')!r}), '127.0.0.1', {port}, Path({str(tmp_path / 'log')!r}))\n"
        "print(s.process.pid, flush=True)\n"
        "time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], env=ENV, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(proc.stdout.readline())
        assert alive(child)
        proc.kill()
        proc.wait()
        assert wait_gone(child), "the KoboldCpp process outlived its launcher killed with SIGKILL"
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------- 3. frontier and attribute

@pytest.fixture
def afile(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("")
    return path


def work_dir_commands(reference: Path, text: Path, work: Path) -> dict[str, list]:
    return {
        "frontier": ["frontier", "--reference", reference, "--text", text, "--work-dir", work, "--ladder", "q4_0",
                     "--bases", "q4_0", "--chunks", "1", "--ctx", "64"],
        "attribute": ["attribute", "--base", reference, "--reference", reference, "--text", text,
                      "--work-dir", work, "--chunks", "1", "--ctx", "64"],
    }


@pytest.mark.parametrize("command", ["frontier", "attribute"])
def test_work_dir_that_cannot_be_made_is_one_line(tmp_path, afile, reference_model, short_text, command):
    for work in (afile / "sub", Path("/proc/1/x")):
        done = nkat(*work_dir_commands(reference_model, short_text, work)[command])
        assert_user_error(done, "--work-dir", str(work), "cannot create")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("command", ["frontier", "attribute"])
def test_refused_run_removes_the_work_dir_it_made(tmp_path, reference_model, short_text, command):
    work = tmp_path / "new" / "work"
    argv = work_dir_commands(tmp_path / "missing.gguf", short_text, work)[command]
    assert_user_error(nkat(*argv), "missing.gguf")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"                    # a directory the user made is never removed
    kept.mkdir()
    assert_user_error(nkat(*work_dir_commands(tmp_path / "missing.gguf", short_text, kept)[command]), "missing.gguf")
    assert kept.is_dir()


def test_damaged_score_cache_is_set_aside_and_the_run_goes_on(tmp_path, base_model, reference_model, short_text):
    from nkat_gguf.cli import main

    work = tmp_path / "w"
    argv = ["attribute", "--base", str(base_model), "--reference", str(reference_model), "--text", str(short_text),
            "--work-dir", str(work), "--groups", "attn_q", "--chunks", "1", "--ctx", "64", "--threads", "2",
            "--json", "--quiet"]
    assert main(argv) == 0
    cache = work / "scores.json"
    whole = cache.read_bytes()
    cache.write_bytes(whole[: len(whole) // 2])   # truncated, as by a full disk or a crash of another tool
    import io
    from contextlib import redirect_stderr, redirect_stdout

    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        assert main(argv) == 0
    notes = [line for line in err.getvalue().splitlines() if line.strip()]
    assert len(notes) == 1 and "scores.json" in notes[0] and "damaged" in notes[0], notes
    assert (work / "scores.json.damaged").read_bytes() == whole[: len(whole) // 2]
    import json

    assert json.loads(cache.read_text()).keys() == json.loads(whole).keys()   # measured again, same keys


def test_score_cache_that_is_not_a_mapping_is_set_aside(tmp_path, capsys):
    from nkat_gguf.measure.scoring import ScoreCache

    for text in ('{"k": {"ppl": 1.0}', "[1, 2]", '{"k": 3}', "\xff\xfe"):
        path = tmp_path / "scores.json"
        path.write_bytes(text.encode("latin-1"))
        cache = ScoreCache(path)
        assert cache.data == {} and not path.exists() and (tmp_path / "scores.json.damaged").is_file()
        assert "set aside" in capsys.readouterr().err
    path.write_text('{"k": {"ppl": 1.0}}')
    assert ScoreCache(path).get("k") == {"ppl": 1.0}


# ---------------------------------------------------------------- 4. --timeout

@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf"])
def test_non_positive_timeout_is_refused_before_anything_starts(tmp_path, timeout):
    from test_kobold import make_theta

    from nkat_gguf.formats.defaults import default_model_path
    from nkat_gguf.integrations.kobold import server as kobold_server

    theta = make_theta(tmp_path / "t.nkat", default_model_path())
    port = kobold_server.free_port()
    env = dict(ENV, TMPDIR=str(tmp_path))       # where a server log would go
    done = subprocess.run([sys.executable, str(REPO / "backend_selector.py"), "--theta", str(theta), "--launch",
                           "--backend", "llama-cpp-python", "--port", str(port), "--timeout", timeout],
                          env=env, capture_output=True, text=True, timeout=120)
    assert_user_error(done, "--timeout")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.nkat"]
    assert not kobold_server.port_in_use("127.0.0.1", port)


# ---------------------------------------------------------------- 5. a signal during a long llama.cpp call

def test_sigterm_stops_a_quantization_at_once(tmp_path, reference_model):
    """IQ3_XXS of the embedded model on one thread takes far longer than the deadline below; the
    quantizer child is killed as soon as the signal arrives."""
    out = tmp_path / "q.gguf"
    proc = popen_nkat("quantize", "--input", reference_model, "--output", out, "--type", "iq3_xxs", "--threads", "1")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".q.gguf.*.partial")) or not children_of(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    workers = children_of(proc.pid)
    time.sleep(1.0)                              # well inside llama_model_quantize
    proc.send_signal(signal.SIGTERM)
    try:
        err = proc.communicate(timeout=15)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert [line for line in err.splitlines() if line.strip()] == ["nkat quantize: stopped by SIGTERM"]
    assert not list(tmp_path.iterdir())
    assert workers and not any(alive(pid) for pid in workers)


def test_quantization_in_a_child_gives_the_same_file_as_before(tmp_path, reference_model, base_model):
    """The child process path writes exactly what llama.cpp writes in-process (conftest's base_model
    is made through quantize_model too, so compare with a direct llama.cpp call)."""
    import llama_cpp

    direct = tmp_path / "direct.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(reference_model).encode(), str(direct).encode(), params) == 0
    assert direct.read_bytes() == base_model.read_bytes()


# ---------------------------------------------------------------- 6. SIGTERM during an optimize trial

def test_sigterm_during_an_optimize_trial_prints_one_line(tmp_path, base_model, reference_model, short_text):
    out = tmp_path / "study"
    proc = popen_nkat("optimize", "--model", base_model, "--reference", reference_model, "--text", short_text,
                      "--output-dir", out, "--ctx", "128", "--chunks", "1", "--threads", "1", "--target-rank", "4",
                      "--mode", "custom", "--trials", "2", "--final-chunks", "0", "--quiet",
                      env=dict(ENV, OPENBLAS_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 300
        while not glob.glob(f"{out}/.nkat-optimize-*/*trial.nkat*"):   # the first trial writes its theta
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert [line for line in err.splitlines() if line.strip()] == ["nkat optimize: stopped by SIGTERM"], err
    assert not glob.glob(f"{out}/.nkat-optimize-*")          # the trial's scratch is gone


# ---------------------------------------------------------------- 7. the vision side

@pytest.fixture
def vit_ready():
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")


TINY_VIT = ["--dim", "16", "--depth", "1", "--heads", "2", "--train-limit", "64", "--test-limit", "32",
            "--no-robustness", "--quiet"]


def test_vit_train_unknown_dataset_is_one_line(vit_ready):
    assert_user_error(nkat("vit", "train", "--dataset", "imagenet"), "--dataset", "imagenet")


@pytest.mark.parametrize("args,words", [
    (["--epochs", "0"], ["epochs must be positive"]),
    (["--epochs", "-3"], ["epochs must be positive"]),
    (["--dataset", "mnist", "--data-dir", "{tmp}/no-such-dir"], ["mnist", "no-such-dir"]),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/no-such-dir"], ["cifar10", "no-such-dir"]),
    # another copy exists (Debian's package, the built-in set), but the directory named does not
    (["--dataset", "fashion-mnist", "--data-dir", "{tmp}/no-such-dir"], ["--data-dir", "no-such-dir"]),
    (["--dataset", "digits", "--data-dir", "{tmp}/no-such-dir"], ["--data-dir", "no-such-dir"]),
    (["--label-smoothing", "2"], ["label smoothing"]),
    (["--mlp-ratio", "0"], ["mlp_ratio"]),
    (["--train-limit", "0"], ["--train-limit"]),
    (["--test-limit", "-5"], ["--test-limit"]),
    (["--weight-decay", "-1"], ["weight decay"]),
    (["--warmup-epochs", "-1"], ["warmup epochs"]),
    (["--randaugment-m", "100"], ["randaugment"]),
    (["--crop-pad", "-5"], ["crop pad"]),
    (["--attn-dropout", "1.5"], ["attn_dropout"]),
])
def test_vit_train_bad_settings_are_one_line(tmp_path, capsys, vit_ready, args, words):
    from nkat_gguf.cli import main

    out = tmp_path / "m.json"
    status = main(["vit", "train", *TINY_VIT, "--output", str(out), "--checkpoint", str(tmp_path / "c.pt"),
                   *(a.replace("{tmp}", str(tmp_path)) for a in args)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(err) == 1 and err[0].startswith("nkat vit: error:"), err
    assert all(w in err[0] for w in words), err[0]
    assert not list(tmp_path.iterdir())


def test_vit_train_resume_from_a_truncated_checkpoint(tmp_path, capsys, vit_ready):
    from nkat_gguf.cli import main

    ckpt = tmp_path / "c.pt"
    assert main(["vit", "train", *TINY_VIT, "--epochs", "1", "--checkpoint", str(ckpt), "--json"]) == 0
    capsys.readouterr()
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[: len(whole) // 2])
    status = main(["vit", "train", *TINY_VIT, "--epochs", "2", "--checkpoint", str(ckpt), "--resume"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(err) == 1 and "c.pt" in err[0] and "checkpoint" in err[0], err
    assert ckpt.read_bytes() == whole[: len(whole) // 2]          # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_a_signal_caught_inside_a_ctypes_callback_prints_nothing_and_is_raised_after(monkeypatch):
    """SIGTERM handled while llama.cpp's log callback runs raises inside a ctypes callback, which
    ctypes reports and drops: that report stays quiet, and the signal is raised when the block
    ends (CI once saw the report printed before 'stopped by SIGTERM')."""
    import ctypes

    from nkat_gguf.util.signals import Terminated, terminate_like_interrupt

    callback = ctypes.CFUNCTYPE(None)(lambda: os.kill(os.getpid(), signal.SIGTERM))
    reported = []  # what ctypes would have printed
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    with pytest.raises(Terminated):
        with terminate_like_interrupt():
            callback()  # the handler runs inside the callback; its Terminated is dropped by ctypes
    assert reported == []
    assert sys.unraisablehook == reported.append  # other reports go where they went before
