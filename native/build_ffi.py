"""cffi (API mode) builder for nkat_gguf._nkat_native: the INT8 kernels and the llama.cpp hook.

Compiled against the ggml headers that the installed llama-cpp-python ships
(site-packages/include) and linked to its libggml-base (llama_cpp/lib, found again at run
time through an rpath). Install with llama-cpp-python already present:

    pip install --no-build-isolation -e .

Without a C compiler, or without those headers and libraries, the build stops with a message
saying what is missing: there is no pure-Python fallback that would half work.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
MODULE = "nkat_gguf._nkat_native"
SOURCES = ["nkat_kernels.c", "nkat_hook.c"]
HEADERS = ["ggml.h", "ggml-backend.h"]
GGML_LIB = "ggml-base"


class NativeBuildError(SystemExit):
    """Stops the build with one clear message (SystemExit so setuptools prints it plainly)."""

    def __init__(self, message: str):
        super().__init__(f"nkat-gguf: cannot build the native shim: {message}")


def llama_cpp_dirs() -> tuple[Path, Path]:
    """(include dir, lib dir) of the installed llama-cpp-python, found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise NativeBuildError(
            "llama-cpp-python is not installed in this environment. Install it first "
            "(pip install llama-cpp-python==0.3.36), then pip install --no-build-isolation -e ."
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    include, lib = package.parent / "include", package / "lib"
    missing = [str(include / h) for h in HEADERS if not (include / h).is_file()]
    if missing:
        raise NativeBuildError(
            f"llama-cpp-python at {package} ships no ggml headers ({', '.join(missing)} missing); "
            "reinstall it (pip install --force-reinstall llama-cpp-python==0.3.36)"
        )
    if not any(lib.glob(f"lib{GGML_LIB}.so*")):
        raise NativeBuildError(f"lib{GGML_LIB}.so not found in {lib}; reinstall llama-cpp-python")
    return include, lib


def check_compiler() -> None:
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        raise NativeBuildError(f"no C compiler ({cc!r} not found); install gcc (apt-get install build-essential)")
    if sys.platform != "linux":
        raise NativeBuildError(f"only Linux is supported by the native shim (this is {sys.platform})")


HEADERS_API = ["nkat_kernels.h", "nkat_hook.h"]


def header_cdef(*paths: Path) -> str:
    """cffi declarations read from our own headers (one source of truth for the C API).

    Drops comments, the C++ guards and preprocessor lines other than integer #defines, which
    is all cffi's parser needs; API mode then checks every declaration against the headers.
    """
    lines = []
    for path in paths:
        text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
        in_cplusplus = False
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("#ifdef __cplusplus"):
                in_cplusplus = True
            elif in_cplusplus:
                in_cplusplus = not stripped.startswith("#endif")
            elif not stripped.startswith("#"):
                lines.append(line)
            elif re.match(r"#define\s+\w+\s+\d+\s*$", stripped):
                lines.append(stripped)
    return "\n".join(lines) + "\n"


def _rel(path: Path) -> str:
    """setuptools wants source paths relative to setup.py's directory (the working directory)."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else Path(rel).as_posix()


def make_builder() -> FFI:
    check_compiler()
    include, lib = llama_cpp_dirs()
    ffi = FFI()
    ffi.cdef(header_cdef(*(HERE / h for h in HEADERS_API)))
    ffi.set_source(
        MODULE,
        "".join(f'#include "{h}"\n' for h in HEADERS_API),
        sources=[_rel(HERE / s) for s in SOURCES],
        include_dirs=[str(HERE), str(include)],
        library_dirs=[str(lib)],
        libraries=[GGML_LIB, "dl"],
        runtime_library_dirs=[str(lib)],
        extra_compile_args=["-O3", "-fopenmp", "-std=gnu11", "-Wall", "-Wno-unused-function"],
        extra_link_args=["-fopenmp"],
        depends=[_rel(HERE / h) for h in ("nkat_kernels.h", "nkat_hook.h", "nkat_cuda.h")],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    # Development build in place: python native/build_ffi.py  (puts the module in plugin/)
    ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "cffi"), target=None, verbose=True)
