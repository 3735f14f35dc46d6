"""KoboldCpp integration: find the launcher, read which options it accepts, pick a backend,
find NKAT models and write one .kcpps per model.

Starting servers and talking HTTP lives in kobold_server. Nothing here builds a shell command
line: launchers are run with argument lists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError
from ...util.child import die_with_parent
from ...formats.nkat_format import NkatMeta, find_base_model, is_nkat_path, read_meta

KOBOLDCPP_ENV = "KOBOLDCPP"
ADMIN_PASSWORD_ENV = "NKAT_KOBOLD_ADMIN_PASSWORD"
LAUNCHER_NAMES = ("koboldcpp.py", "koboldcpp")
KOBOLD_BACKENDS = ("cuda", "vulkan", "clblast", "cpu")
BACKENDS = KOBOLD_BACKENDS + ("llama-cpp-python",)
# Native libraries a KoboldCpp launcher loads with ctypes, by the suffix of koboldcpp_<kind>.
LIBRARY_KINDS = ("default", "failsafe", "noavx2", "clblast", "clblast_noavx2", "cublas",
                 "hipblas", "vulkan", "vulkan_noavx2")
DEFAULT_PORT = 5001
DEFAULT_CONTEXT = 4096
HELP_TIMEOUT_S = 60

_BACKEND_KEYS = ("usecuda", "usecublas", "usevulkan", "useclblast")


# ---------------------------------------------------------------- the launcher and its --help

@dataclass
class LauncherOption:
    dest: str              # argparse dest: the first long option, dashes as underscores
    flags: list[str]
    invocation: str        # the help's invocation text, e.g. "--lora [lora_filename] [[lora_base] ...]"

    @property
    def takes_value(self) -> bool:
        rest = self.invocation
        for flag in self.flags:
            rest = rest.replace(flag, "")
        return bool(rest.replace(",", "").strip())


@dataclass
class Launcher:
    path: Path
    command: list[str]                # argv prefix that runs it
    version: str | None
    options: dict[str, LauncherOption]
    positionals: list[str]
    libraries: list[str]              # LIBRARY_KINDS available to it
    libraries_source: str             # "files beside it" or "inferred from the binary name"

    def accepts(self, dest: str) -> bool:
        return dest in self.options

    @property
    def has_loramult(self) -> bool:
        return self.accepts("loramult")

    @property
    def has_admin(self) -> bool:
        return self.accepts("admin") and self.accepts("admindir")

    @property
    def lora_takes_base(self) -> bool:
        """1.76-style `--lora FILE [BASE]`; newer releases take only adapter files."""
        option = self.options.get("lora")
        return bool(option and "lora_base" in option.invocation)

    @property
    def cuda_key(self) -> str:
        return "usecuda" if self.accepts("usecuda") else "usecublas"

    def summary(self) -> dict:
        return {"path": str(self.path), "version": self.version, "libraries": self.libraries,
                "libraries_source": self.libraries_source, "loramult": self.has_loramult,
                "admin": self.has_admin, "lora_base_argument": self.lora_takes_base}


def _launcher_in(directory: Path) -> Path | None:
    for name in LAUNCHER_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def find_launcher_path(given: str | os.PathLike | None = None) -> Path | None:
    """--koboldcpp PATH, then $KOBOLDCPP, then koboldcpp.py / koboldcpp on PATH; None if absent."""
    for value, what in ((given, "--koboldcpp"), (os.environ.get(KOBOLDCPP_ENV), f"${KOBOLDCPP_ENV}")):
        if not value:
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            found = _launcher_in(path)
            if found is None:
                raise UserError(f"{what} {path}: a directory without koboldcpp.py or a koboldcpp binary")
            return found.resolve()
        if not path.is_file():
            raise UserError(f"{what} {path}: no such file")
        return path.resolve()
    for name in LAUNCHER_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found).resolve()
    return None


def launcher_command(path: Path) -> list[str]:
    if path.suffix == ".py":
        return [sys.executable, str(path)]
    if not os.access(path, os.X_OK):
        raise UserError(f"{path}: not a KoboldCpp launcher (neither koboldcpp.py nor an executable)")
    return [str(path)]


def run_help(command: list[str], timeout: float = HELP_TIMEOUT_S) -> str:
    try:
        done = subprocess.run(command + ["--help"], capture_output=True, text=True,
                              errors="replace", timeout=timeout, stdin=subprocess.DEVNULL,
                              preexec_fn=die_with_parent())
    except subprocess.TimeoutExpired:
        raise UserError(f"{command[-1]}: --help did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise UserError(f"{command[-1]}: cannot run it ({exc.strerror or exc})") from None
    return done.stdout + done.stderr


_OPTION_LINE = re.compile(r"^  (-\S.*)$")          # invocations sit at indent 2, help text deeper
_FLAG = re.compile(r"(?:^|, )(--?[A-Za-z0-9][\w-]*)")
_VERSION = re.compile(r"KoboldCpp[^\n]*?Version\s+v?([0-9][\w.]*)", re.IGNORECASE)


def parse_help(text: str) -> tuple[dict[str, LauncherOption], list[str], str | None]:
    """Options (by dest), positional names and the version from argparse --help output."""
    options: dict[str, LauncherOption] = {}
    positionals: list[str] = []
    section = ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            section = line.strip().lower()
            continue
        match = _OPTION_LINE.match(line)
        if match:
            invocation = re.split(r"\s{2,}", match.group(1).strip())[0]
            flags = _FLAG.findall(invocation)
            longs = [f for f in flags if f.startswith("--")]
            if longs:
                dest = longs[0][2:].replace("-", "_")
                options[dest] = LauncherOption(dest, flags, invocation)
        elif section.startswith("positional") and re.match(r"^  [a-z_]+(\s|$)", line):
            positionals.append(line.split()[0])
    version = _VERSION.search(text)
    return options, positionals, version.group(1) if version else None


def libraries_beside(path: Path) -> list[str]:
    """koboldcpp_<kind>.so/.dll (or precompiled_...) next to the launcher."""
    found = []
    for kind in LIBRARY_KINDS:
        names = [f"{prefix}koboldcpp_{kind}{ext}" for prefix in ("", "precompiled_") for ext in (".so", ".dll")]
        if any((path.parent / name).is_file() for name in names):
            found.append(kind)
    return found


def libraries_from_binary_name(name: str) -> list[str]:
    """A packaged binary carries its libraries inside; its release name says which."""
    name = name.lower()
    libs = ["default", "failsafe", "noavx2", "vulkan", "vulkan_noavx2", "clblast", "clblast_noavx2"]
    if "rocm" in name or "hipblas" in name:
        libs.append("hipblas")
    elif "nocuda" not in name and "oldpc" not in name:
        libs.append("cublas")
    return libs


def probe_launcher(path: Path) -> Launcher:
    """Run `<launcher> --help` and read what it accepts; UserError if it is not KoboldCpp."""
    command = launcher_command(path)
    text = run_help(command)
    options, positionals, version = parse_help(text)
    if "koboldcpp" not in text.lower() or "model" not in options or "config" not in options:
        raise UserError(f"{path}: not a KoboldCpp launcher (its --help lists no KoboldCpp --model/--config)")
    libraries = libraries_beside(path)
    source = "files beside it"
    if not libraries and path.suffix != ".py":
        libraries, source = libraries_from_binary_name(path.name), "inferred from the binary name"
    return Launcher(path, command, version, options, positionals, libraries, source)


def find_launcher(given=None) -> Launcher | None:
    path = find_launcher_path(given)
    return probe_launcher(path) if path else None


# ---------------------------------------------------------------- GPU and backend choice

@dataclass
class GpuInfo:
    vendor: str | None = None          # "nvidia", "amd", "other" or None
    name: str | None = None
    source: str = ""

    @property
    def present(self) -> bool:
        return self.vendor is not None


def _nvidia_smi_names() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split(":", 1)[1].split("(")[0].strip() for line in out.splitlines() if line.startswith("GPU ")]


def detect_gpu() -> GpuInfo:
    """NVIDIA through nvidia-smi or the driver's /proc entry; AMD/others through /dev/dri and /dev/kfd."""
    names = _nvidia_smi_names()
    if names:
        return GpuInfo("nvidia", names[0], "nvidia-smi")
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return GpuInfo("nvidia", None, "/proc/driver/nvidia")
    if Path("/dev/kfd").exists():
        return GpuInfo("amd", None, "/dev/kfd")
    dri = Path("/dev/dri")
    if dri.is_dir() and any(dri.glob("renderD*")):
        return GpuInfo("other", None, "/dev/dri")
    return GpuInfo(source="none found")


@dataclass
class Backend:
    name: str                          # one of BACKENDS
    library: str | None                # the KoboldCpp library kind it loads
    reason: str
    config: dict = field(default_factory=dict)  # .kcpps keys that select it

    def summary(self) -> dict:
        return {"name": self.name, "library": self.library, "reason": self.reason}


def _cpu_library(libs: list[str]) -> str | None:
    for kind in ("default", "noavx2", "failsafe"):
        if kind in libs:
            return kind
    return None


def _backend_config(name: str, library: str, launcher: Launcher) -> dict:
    """The backend keys of a .kcpps: the chosen one set, every other one cleared."""
    config = {key: None for key in _BACKEND_KEYS if launcher.accepts(key)}
    config["usecpu"] = False
    config["noavx2"] = library.endswith("noavx2") or library == "failsafe"
    if launcher.accepts("failsafe"):
        config["failsafe"] = library == "failsafe"
    if name == "cuda":
        config[launcher.cuda_key] = ["normal"]
    elif name == "vulkan":
        config["usevulkan"] = []          # empty list: use Vulkan, let it pick the device
    elif name == "clblast":
        config["useclblast"] = [0, 0]
    else:
        config["usecpu"] = True
        if library == "failsafe" and not launcher.accepts("failsafe"):
            config["nommap"] = True       # older launchers pick failsafe from noavx2 + usecpu + nommap
    return {k: v for k, v in config.items() if launcher.accepts(k)}


_GPU_LIBRARIES = {"cuda": ("cublas", "hipblas"), "vulkan": ("vulkan", "vulkan_noavx2"),
                  "clblast": ("clblast", "clblast_noavx2")}


def _library_for(name: str, libs: list[str]) -> str | None:
    if name == "cpu":
        return _cpu_library(libs)
    return next((kind for kind in _GPU_LIBRARIES[name] if kind in libs), None)


def select_backend(requested: str | None, launcher: Launcher | None, gpu: GpuInfo) -> Backend:
    """--backend when given (checked against the libraries present), else the best match."""
    if requested and requested not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {requested!r}")
    if requested == "llama-cpp-python" or launcher is None:
        if requested and requested != "llama-cpp-python":
            raise UserError(f"--backend {requested} needs KoboldCpp: pass --koboldcpp PATH or set ${KOBOLDCPP_ENV}")
        why = "requested" if requested else "no KoboldCpp found: embedded llama-cpp-python server"
        return Backend("llama-cpp-python", None, why)
    libs = launcher.libraries
    if requested:
        library = _library_for(requested, libs)
        if library is None:
            raise UserError(f"--backend {requested}: no matching koboldcpp library beside {launcher.path} "
                            f"(found: {', '.join(libs) or 'none'})")
        return Backend(requested, library, "requested", _backend_config(requested, library, launcher))
    name, reason = _auto_backend(libs, gpu)
    library = _library_for(name, libs)
    if library is None:
        raise UserError(f"{launcher.path}: no koboldcpp_default/_noavx2/_failsafe library beside it")
    return Backend(name, library, reason, _backend_config(name, library, launcher))


def _auto_backend(libs: list[str], gpu: GpuInfo) -> tuple[str, str]:
    if gpu.vendor == "nvidia" and "cublas" in libs:
        return "cuda", "NVIDIA GPU and koboldcpp_cublas present"
    if gpu.vendor == "amd" and "hipblas" in libs:
        return "cuda", "AMD GPU and koboldcpp_hipblas present"
    if gpu.present and _library_for("vulkan", libs):
        return "vulkan", f"{gpu.vendor} GPU and koboldcpp_vulkan present"
    if gpu.present and _library_for("clblast", libs):
        return "clblast", f"{gpu.vendor} GPU and koboldcpp_clblast present"
    return "cpu", "no usable GPU library for this machine" if gpu.present else "no GPU found"


# ---------------------------------------------------------------- NKAT models

@dataclass
class NkatModel:
    theta: Path
    base: Path
    meta: NkatMeta

    @property
    def name(self) -> str:
        return self.theta.stem

    def summary(self) -> dict:
        return {"name": self.name, "theta": str(self.theta), "base": str(self.base),
                "rank": self.meta.theta_rank, "gamma": self.meta.theta_gamma,
                "theta_bytes": self.meta.theta_bytes}


@dataclass
class PlainModel:
    """A GGUF served as it is, with no theta: what `nkat kobold --fit` registers and launches."""
    base: Path
    theta: None = None

    @property
    def name(self) -> str:
        return self.base.stem

    def summary(self) -> dict:
        return {"name": self.name, "theta": None, "base": str(self.base),
                "file_bytes": self.base.stat().st_size}


def nkat_files(models_dir: Path | None, thetas: list[str] | None) -> list[Path]:
    if thetas:
        return [Path(t) for t in thetas]
    if models_dir is None or not models_dir.is_dir():
        return []
    return sorted(models_dir.glob("*.nkat"))


def resolve_model(theta: Path, base: str | os.PathLike | None = None,
                  models_dir: Path | None = None) -> NkatModel:
    """The .nkat with its base model (nkat_format.find_base_model: --model, the recorded path,
    the .nkat's directory, the models directory), checked by fingerprint."""
    base_path = find_base_model(theta, base, models_dir)
    return NkatModel(theta.resolve(), base_path.resolve(), read_meta(theta))


def find_models(models_dir: Path | None, thetas: list[str] | None, base=None) -> list[NkatModel]:
    if is_nkat_path(base):  # --model X.nkat: that adapter, its base found from its metadata
        thetas, base = [str(base)] + list(thetas or []), None
    return [resolve_model(path, base, models_dir) for path in nkat_files(models_dir, thetas)]
