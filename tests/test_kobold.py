"""nkat kobold: launcher probing, backend choice, .kcpps registration, the embedded fallback server.

KoboldCpp is on no registry this project reaches, so the launcher tests write small koboldcpp.py
scripts whose argparse parsers declare the option strings, metavars and nargs of the real
launchers (read from KoboldCpp's koboldcpp.py: the 1.7x/1.81 family for "old", 1.102 for "new";
help texts shortened). Their --help is real argparse output; asked to start they load the .kcpps
the way KoboldCpp does and then exit 1, which is also how start-up failures are tested.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.integrations.kobold import discovery as kobold
from nkat_gguf.integrations.kobold import server as kobold_server
from nkat_gguf.cli import main
from nkat_gguf.formats.defaults import default_model_path
from nkat_gguf.errors import UserError
from nkat_gguf.formats.gguf_io import ModelFile
from nkat_gguf.formats.nkat_format import NkatMeta, ThetaFactors, write_nkat

# ---------------------------------------------------------------- launcher excerpts

_COMMON = [
    (("model_param",), dict(help="Model file to load (positional)", nargs="?")),
    (("port_param",), dict(help="Port to listen on (positional)", nargs="?", type=int)),
    (("--host",), dict(metavar="[ipaddr]", default="")),
    (("--launch",), dict(action="store_true")),
    (("--config",), dict(metavar="[filename]", type=str, nargs=1)),
    (("--useclblast",), dict(type=int, choices=range(0, 9), nargs=2)),
    (("--usecpu",), dict(action="store_true")),
    (("--usemlock",), dict(action="store_true")),
    (("--noavx2",), dict(action="store_true")),
    (("--debugmode",), dict(nargs="?", const=1, type=int, default=0)),
    (("--onready",), dict(metavar="[shell command]", type=str, default="", nargs=1)),
    (("--multiuser",), dict(metavar="limit", nargs="?", const=1, type=int, default=1)),
    (("--quiet",), dict(action="store_true")),
    (("--mmproj",), dict(default="")),
    (("--password",), dict(default=None)),
    (("--flashattention",), dict(action="store_true")),
    (("--quantkv",), dict(type=int, choices=[0, 1, 2], default=0)),
    (("--showgui",), dict(action="store_true")),
    (("--skiplauncher",), dict(action="store_true")),
    (("--hordekey",), dict(metavar="[apikey]", default="")),
    (("--sdmodel",), dict(metavar="[filename]", default="")),
    (("--sdloramult",), dict(metavar="[amount]", type=float, default=1.0)),
    (("--whispermodel",), dict(metavar="[filename]", default="")),
]
OLD_OPTIONS = [  # 1.76 family: --lora FILE [BASE], no --loramult, no admin mode, --usecublas
    (("--model",), dict(metavar="[filename]", type=str, default="")),
    (("--port",), dict(metavar="[portnumber]", default=5001, type=int)),
    (("--threads",), dict(metavar="[threads]", type=int, default=1)),
    (("--usecublas",), dict(nargs="*", metavar="[lowvram|normal] [main GPU ID] [mmq] [rowsplit]",
                            choices=["normal", "lowvram", "0", "1", "2", "3", "mmq", "rowsplit"])),
    (("--usevulkan",), dict(metavar="[Device ID]", nargs="*", type=int, default=None)),
    (("--contextsize",), dict(metavar="[256,512,1024,2048,3072,4096]", type=int, default=4096)),
    (("--gpulayers",), dict(metavar="[GPU layers]", nargs="?", const=1, type=int, default=-1)),
    (("--blasbatchsize",), dict(type=int, choices=[-1, 32, 64, 128, 256, 512, 1024, 2048], default=512)),
    (("--lora",), dict(metavar=("[lora_filename]", "[lora_base]"), nargs="+")),
    (("--nommap",), dict(action="store_true")),
] + _COMMON
NEW_OPTIONS = [  # current release: --lora FILE..., --loramult, admin mode, --usecuda
    (("--model", "-m"), dict(metavar="[filenames]", type=str, nargs="+", default=[])),
    (("--port",), dict(metavar="[portnumber]", default=5001, type=int)),
    (("--threads", "-t"), dict(metavar="[threads]", type=int, default=1)),
    (("--usecuda", "--usecublas", "--usehipblas"),
     dict(nargs="*", metavar="[main GPU ID] [mmq|nommq] [rowsplit]",
          choices=["normal", "lowvram", "0", "1", "2", "3", "all", "mmq", "nommq", "rowsplit"])),
    (("--usevulkan",), dict(metavar="[Device IDs]", nargs="*", type=int, default=None)),
    (("--contextsize", "--ctx-size", "-c"), dict(metavar="[256 to 262144]", type=int, default=8192)),
    (("--gpulayers", "--gpu-layers", "--n-gpu-layers", "-ngl"),
     dict(metavar="[GPU layers]", nargs="?", const=1, type=int, default=-1)),
    (("--version",), dict(action="store_true")),
    (("--batchsize", "--blasbatchsize", "--batch-size", "-b"), dict(type=int, default=512)),
    (("--lora",), dict(metavar="[lora_filename]", nargs="+")),
    (("--loramult",), dict(metavar="[amount]", type=float, default=1.0)),
    (("--usemmap",), dict(action="store_true")),
    (("--failsafe",), dict(action="store_true")),
    (("--admin",), dict(action="store_true")),
    (("--adminpassword",), dict(metavar="[password]", default=None)),
    (("--admindir",), dict(metavar="[directory]", default="")),
] + _COMMON

_LAUNCHER = '''\
#!{python}
import argparse, json, os, sys
parser = argparse.ArgumentParser(description="KoboldCpp Server - Version {version}")
for flags, kwargs in {options!r}:
    if "type" in kwargs:
        kwargs["type"] = {{"int": int, "float": float, "str": str}}[kwargs["type"]]
    parser.add_argument(*flags, **kwargs)
args = parser.parse_args()
if args.config:
    # Like KoboldCpp: the config's keys are set over the parsed defaults.
    with open(args.config[0], encoding="utf-8") as f:
        config = json.load(f)
    known = set(vars(args)) | {{"istemplate"}}
    print("unknown keys:", sorted(set(config) - known), flush=True)
    for key, value in config.items():
        setattr(args, key, value)
    print("model exists:", os.path.isfile(args.model_param), flush=True)
    print("lora exists:", os.path.isfile(args.lora[0]), flush=True)
print("this is a --help excerpt of KoboldCpp, not KoboldCpp: exiting", flush=True)
sys.exit(1)
'''


def _literal(options):
    """The option table as Python literals (type names, choices as lists) for the script."""
    out = []
    for flags, kwargs in options:
        kwargs = dict(kwargs)
        if "type" in kwargs:
            kwargs["type"] = kwargs["type"].__name__
        if isinstance(kwargs.get("choices"), range):
            kwargs["choices"] = list(kwargs["choices"])
        out.append((flags, kwargs))
    return out


def expected_dests(kind: str) -> set[str]:
    options = OLD_OPTIONS if kind == "old" else NEW_OPTIONS
    longs = [next(f for f in flags if f.startswith("--")) for flags, _ in options if flags[0].startswith("-")]
    return {f[2:].replace("-", "_") for f in longs} | {"help"}


def make_launcher(directory: Path, kind: str, libraries=("default",)) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    options, version = (OLD_OPTIONS, "1.76") if kind == "old" else (NEW_OPTIONS, "1.102")
    text = _LAUNCHER.format(python=sys.executable, version=version, options=_literal(options))
    path = directory / "koboldcpp.py"
    path.write_text(text, encoding="utf-8")
    for lib in libraries:
        (directory / f"koboldcpp_{lib}.so").write_bytes(b"\x7fELF")
    return path


def help_options(launcher: Path) -> set[str]:
    """Long options the launcher's --help lists, read independently of nkat_gguf.integrations.kobold.discovery."""
    text = subprocess.run([sys.executable, str(launcher), "--help"], capture_output=True, text=True).stdout
    found = set()
    for line in text.splitlines():
        if line.startswith("  -"):
            for token in line.replace(",", " ").split():
                if token.startswith("--"):
                    found.add(token[2:])
    return found


# ---------------------------------------------------------------- NKAT fixtures

@pytest.fixture(scope="module")
def base_model() -> Path:
    return default_model_path()


def make_theta(path: Path, base: Path, rank: int = 8, record_path: str | None = None) -> Path:
    model = ModelFile(base)
    rng = np.random.default_rng(1)
    factors = []
    for name in ("blk.0.attn_q.weight", "blk.1.attn_q.weight"):
        n_out, n_in = model.shape(name)
        factors.append(ThetaFactors(name, rng.standard_normal((rank, n_in)).astype(np.float32) * 0.01,
                                    rng.standard_normal((n_out, rank)).astype(np.float32) * 0.01))
    identity = model.identity()
    if record_path is not None:
        identity = dataclasses.replace(identity, path=record_path)
    write_nkat(path, model.architecture, factors,
               NkatMeta(theta_rank=rank, theta_gamma=2.0, source="residual", structure="general",
                        theta_type="q8_0", base=identity))
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, base_model) -> Path:
    """A models directory with a space and non-ASCII characters in every path."""
    directory = tmp_path_factory.mktemp("nkat") / "mes modèles NKAT"
    directory.mkdir()
    make_theta(directory / "SmolLM2 théta r8.nkat", base_model)
    return directory


def run_cli(*argv) -> int:
    return main(["kobold", *map(str, argv)])


# ---------------------------------------------------------------- --help probing

@pytest.mark.parametrize("kind,version,loramult,admin,lora_base,cuda_key", [
    ("old", "1.76", False, False, True, "usecublas"),
    ("new", "1.102", True, True, False, "usecuda"),
])
def test_probe_reads_what_each_launcher_accepts(tmp_path, kind, version, loramult, admin, lora_base, cuda_key):
    launcher = kobold.probe_launcher(make_launcher(tmp_path / "kcpp dir", kind, ["default", "vulkan"]))
    assert launcher.version == version
    assert launcher.has_loramult is loramult
    assert launcher.has_admin is admin
    assert launcher.lora_takes_base is lora_base
    assert launcher.cuda_key == cuda_key
    assert launcher.libraries == ["default", "vulkan"]
    assert "model_param" in launcher.positionals
    assert set(launcher.options) == expected_dests(kind)
    assert not launcher.options["skiplauncher"].takes_value
    assert launcher.options["lora"].takes_value


def test_parse_help_takes_first_long_option_as_dest():
    text = textwrap.dedent("""\
        usage: koboldcpp.py [-h]
        KoboldCpp Server - Version 1.99

        options:
          --usecuda [main GPU ID] [mmq|nommq] [rowsplit] ..., --usecublas [main GPU ID] [mmq|nommq] [rowsplit] ...
                                Use CUDA for GPU Acceleration.
          --contextsize, --ctx-size, -c [256 to 262144]
                                Controls the memory allocated. Setting it to
                                -1 disables batched mode
          --skiplauncher        Doesn't display or use the GUI launcher.
        """)
    options, positionals, version = kobold.parse_help(text)
    assert version == "1.99"
    assert set(options) == {"usecuda", "contextsize", "skiplauncher"}   # "-1 disables" is help text
    assert options["contextsize"].takes_value and not options["skiplauncher"].takes_value


def test_a_path_that_is_not_a_launcher_is_refused(tmp_path, models_dir):
    other = tmp_path / "koboldcpp.py"
    other.write_text("import argparse\nargparse.ArgumentParser(description='some other tool').parse_args()\n")
    with pytest.raises(UserError, match="not a KoboldCpp launcher"):
        kobold.probe_launcher(other)
    assert run_cli("--koboldcpp", other, "--models-dir", models_dir, "--json") == 2
    assert run_cli("--koboldcpp", tmp_path / "missing.py", "--json") == 2


def test_launcher_found_through_env_and_directory(tmp_path, monkeypatch):
    path = make_launcher(tmp_path / "kc", "new")
    monkeypatch.setenv(kobold.KOBOLDCPP_ENV, str(tmp_path / "kc"))
    assert kobold.find_launcher_path() == path.resolve()
    monkeypatch.delenv(kobold.KOBOLDCPP_ENV)
    monkeypatch.setenv("PATH", str(tmp_path))     # nothing named koboldcpp on this PATH
    assert kobold.find_launcher_path() is None


# ---------------------------------------------------------------- backend choice from files on disk

NVIDIA = kobold.GpuInfo("nvidia", "RTX", "test")
AMD = kobold.GpuInfo("amd", None, "test")
NO_GPU = kobold.GpuInfo()


@pytest.mark.parametrize("libraries,gpu,requested,expected,library", [
    (["default", "cublas", "vulkan", "clblast"], NVIDIA, None, "cuda", "cublas"),
    (["default", "vulkan", "clblast"], NVIDIA, None, "vulkan", "vulkan"),
    (["default", "clblast"], AMD, None, "clblast", "clblast"),
    (["default", "hipblas", "vulkan"], AMD, None, "cuda", "hipblas"),
    (["default", "cublas", "vulkan"], NO_GPU, None, "cpu", "default"),
    (["noavx2", "failsafe"], NO_GPU, None, "cpu", "noavx2"),
    (["default", "cublas", "vulkan"], NVIDIA, "vulkan", "vulkan", "vulkan"),
    (["default", "cublas"], NVIDIA, "cpu", "cpu", "default"),
])
def test_backend_follows_libraries_and_gpu(tmp_path, libraries, gpu, requested, expected, library):
    launcher = kobold.probe_launcher(make_launcher(tmp_path / "kc", "new", libraries))
    backend = kobold.select_backend(requested, launcher, gpu)
    assert (backend.name, backend.library) == (expected, library)


def test_backend_config_flags_for_each_launcher(tmp_path):
    old = kobold.probe_launcher(make_launcher(tmp_path / "old", "old", ["default", "cublas", "failsafe"]))
    new = kobold.probe_launcher(make_launcher(tmp_path / "new", "new", ["default", "cublas", "vulkan"]))
    assert kobold.select_backend("cuda", old, NVIDIA).config["usecublas"] == ["normal"]
    cuda_new = kobold.select_backend("cuda", new, NVIDIA).config
    assert cuda_new["usecuda"] == ["normal"] and cuda_new["usecpu"] is False and cuda_new["usevulkan"] is None
    assert "usecublas" not in cuda_new                  # an alias, not an option of its own
    vulkan = kobold.select_backend(None, new, kobold.GpuInfo("other", None, "test")).config
    assert vulkan["usevulkan"] == [] and vulkan["usecuda"] is None
    # 1.76 has no --failsafe: failsafe is reached through noavx2 + usecpu + nommap there.
    failsafe = kobold._backend_config("cpu", "failsafe", old)
    assert failsafe == {"usecublas": None, "usevulkan": None, "useclblast": None, "usecpu": True,
                        "noavx2": True, "nommap": True}


def test_backend_override_needs_its_library(tmp_path):
    launcher = kobold.probe_launcher(make_launcher(tmp_path / "kc", "new", ["default"]))
    with pytest.raises(UserError, match="cublas|matching"):
        kobold.select_backend("cuda", launcher, NVIDIA)
    assert kobold.select_backend(None, None, NVIDIA).name == "llama-cpp-python"
    with pytest.raises(UserError, match="needs KoboldCpp"):
        kobold.select_backend("vulkan", None, NVIDIA)


# ---------------------------------------------------------------- .kcpps registration

@pytest.mark.parametrize("kind", ["old", "new"])
def test_register_writes_configs_each_launcher_accepts(tmp_path, models_dir, base_model, kind):
    launcher = make_launcher(tmp_path / "KoboldCpp ü", kind, ["default", "vulkan"])
    admindir = tmp_path / "admin dir é"
    assert run_cli("--koboldcpp", launcher, "--models-dir", models_dir, "--register", "--admindir", admindir,
                   "--backend", "cpu", "--port", 5099, "--context-size", 2048, "--json") == 0
    written = sorted(admindir.iterdir())
    assert [p.name for p in written] == ["SmolLM2 théta r8.kcpps"]
    config = json.loads(written[0].read_text(encoding="utf-8"))
    accepted = {o.replace("-", "_") for o in help_options(launcher)} | {"model_param", "port_param", "istemplate"}
    assert set(config) <= accepted                       # nothing the launcher does not know
    assert config["lora"] == [str(models_dir / "SmolLM2 théta r8.nkat")]
    assert config["model_param"] == str(base_model.resolve())
    assert (config["contextsize"], config["port"], config["port_param"]) == (2048, 5099, 5099)
    assert config["host"] == "127.0.0.1" and config["usecpu"] is True and config["gpulayers"] == 0
    assert config["skiplauncher"] is True and config["onready"] == "" and config["usevulkan"] is None
    assert config["flashattention"] is False            # complete: every flag has its value
    if kind == "old":
        assert "loramult" not in config and "admin" not in config
        assert config["model"] == str(base_model.resolve()) and "usecublas" in config
    else:
        assert config["loramult"] == 1.0 and config["admin"] is False and config["adminpassword"] is None
        assert config["model"] == [str(base_model.resolve())] and "usecuda" in config
    # The launcher itself reads the config back: no unknown keys, both files found.
    out = subprocess.run([sys.executable, str(launcher), "--config", str(written[0])],
                         capture_output=True, text=True).stdout
    assert "unknown keys: []" in out and "model exists: True" in out and "lora exists: True" in out


def test_loramult_on_an_old_launcher_is_refused_and_nothing_written(tmp_path, models_dir):
    launcher = make_launcher(tmp_path / "kc", "old")
    admindir = tmp_path / "admin"
    assert run_cli("--koboldcpp", launcher, "--models-dir", models_dir, "--register", "--admindir", admindir,
                   "--lora-mult", 0.5, "--json") == 2
    assert not admindir.exists() or not any(admindir.iterdir())


def test_unwritable_admindir_is_a_user_error(tmp_path, models_dir):
    launcher = make_launcher(tmp_path / "kc", "new")
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    assert run_cli("--koboldcpp", launcher, "--models-dir", models_dir, "--register",
                   "--admindir", blocker / "admin", "--json") == 2
    assert blocker.read_text() == "x"


def test_nkat_with_missing_or_wrong_base_model(tmp_path, base_model, models_dir, capsys):
    lost = make_theta(tmp_path / "lost.nkat", base_model, record_path=str(tmp_path / "gone.gguf"))
    assert run_cli("--theta", lost, "--backend", "llama-cpp-python", "--json") == 2
    assert "base model not found" in capsys.readouterr().err
    other = tmp_path / "other.gguf"
    data = bytearray(base_model.read_bytes())
    data[len(data) // 2 + 10] ^= 0xFF                    # same size, different weights
    other.write_bytes(bytes(data))
    theta = models_dir / "SmolLM2 théta r8.nkat"
    assert run_cli("--theta", theta, "--model", other, "--backend", "llama-cpp-python", "--json") == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and len(err.strip().splitlines()) == 1


def test_register_without_a_launcher_or_admindir(tmp_path, models_dir, monkeypatch):
    monkeypatch.delenv(kobold.KOBOLDCPP_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_cli("--models-dir", models_dir, "--register", "--admindir", tmp_path / "a", "--json") == 2
    assert run_cli("--models-dir", models_dir, "--register", "--json") == 2


# ---------------------------------------------------------------- launching

def test_port_in_use_is_refused(tmp_path, models_dir):
    launcher = make_launcher(tmp_path / "kc", "new")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert run_cli("--koboldcpp", launcher, "--models-dir", models_dir, "--launch", "--smoke-only",
                       "--port", port, "--json") == 2


def test_koboldcpp_exiting_during_startup_shows_its_log(tmp_path, models_dir, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where the start-up config goes
    launcher = make_launcher(tmp_path / "kc", "old")
    port = kobold_server.free_port()
    assert run_cli("--koboldcpp", launcher, "--models-dir", models_dir, "--launch", "--smoke-only",
                   "--port", port, "--timeout", 60, "--json") == 2
    err = capsys.readouterr().err
    assert "exited with status 1 during start-up" in err
    assert "  | lora exists: True" in err and "unknown keys: []" in err
    assert not list(tmp_path.glob("nkat-kobold-*"))       # start-up config and its directory removed


def test_admin_password_never_reaches_output_or_admindir(tmp_path, models_dir, monkeypatch, capfd):
    launcher = make_launcher(tmp_path / "kc", "new")
    secret = "s3cret-Pässword"
    monkeypatch.setenv(kobold.ADMIN_PASSWORD_ENV, secret)
    admindir = tmp_path / "admin"
    log = tmp_path / "kobold.log"
    code = run_cli("--koboldcpp", launcher, "--models-dir", models_dir, "--register", "--admindir", admindir,
                   "--launch", "--smoke-only", "--port", kobold_server.free_port(), "--log", log, "--json")
    assert code == 2                                     # the excerpt launcher exits during start-up
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    assert secret not in log.read_text(encoding="utf-8")
    assert all(secret not in p.read_text(encoding="utf-8") for p in admindir.iterdir())


def test_embedded_fallback_serves_base_plus_theta(tmp_path, models_dir, capsys):
    """The real llama-cpp-python server on a free loopback port: start, generate, stop."""
    if kobold_server.server_extras_missing():
        pytest.skip(f"llama-cpp-python server extras missing: {kobold_server.SERVER_EXTRAS_PIP}")
    port = kobold_server.free_port()
    log = tmp_path / "server.log"
    code = run_cli("--models-dir", models_dir, "--backend", "llama-cpp-python", "--launch", "--smoke-only",
                   "--port", port, "--context-size", 512, "--max-tokens", 8, "--timeout", 120,
                   "--log", log, "--json")
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out)["launch"]
    assert result["server"] == "llama-cpp-python" and result["url"] == f"http://127.0.0.1:{port}"
    assert result["generated"].strip() and result["stopped"] is True
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "loading lora adapter" in text and "SmolLM2 théta r8.nkat" in text
    assert not kobold_server.port_in_use("127.0.0.1", port)   # stopped again


# ---------------------------------------------------------------- a real KoboldCpp, when given

@pytest.mark.skipif(not os.environ.get(kobold.KOBOLDCPP_ENV),
                    reason="KoboldCpp is on no package registry here: set $KOBOLDCPP to an installed launcher")
def test_live_koboldcpp(tmp_path, models_dir, capsys):
    admindir = tmp_path / "admin"
    port = kobold_server.free_port()
    code = run_cli("--models-dir", models_dir, "--register", "--admindir", admindir, "--launch",
                   "--smoke-only", "--port", port, "--context-size", 512, "--timeout", 300, "--json")
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out)
    assert result["launch"]["server"] == "koboldcpp" and result["launch"]["generated"].strip()
    assert len(list(admindir.glob("*.kcpps"))) == 1
    assert not kobold_server.port_in_use("127.0.0.1", port)


def test_entry_point_script_runs_the_kobold_command(models_dir):
    script = Path(__file__).resolve().parents[1] / "backend_selector.py"
    done = subprocess.run([sys.executable, str(script), "--models-dir", str(models_dir),
                           "--backend", "llama-cpp-python", "--json"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["models"][0]["name"] == "SmolLM2 théta r8"
