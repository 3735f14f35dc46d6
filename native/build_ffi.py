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


CDEF = """
typedef struct nkat_factors {
    int64_t n_out, n_in, rank;
    const int8_t *A_q; const float *A_s; const int8_t *Bt_q; const float *B_s;  /* Bt_q tiled */
} nkat_factors;
#define NKAT_MAX_RANK 4096
#define NKAT_TILE 64
int64_t nkat_tiled_b_size(int64_t rank, int64_t n_out);
void nkat_tile_b(const int8_t *Bt_plain, int64_t rank, int64_t n_out, int8_t *Bt_tiled);
int nkat_star_apply(const nkat_factors *f, const float *x, int64_t x_stride, float *y,
                    int64_t y_stride, int64_t n_cols, float s, int n_threads);
const char *nkat_isa_name(void);
int nkat_isa_best(void);
int nkat_isa_set(int isa);

#define NKAT_SKIP_COUNT 8
#define NKAT_DETAIL_LEN 320
typedef struct nkat_stats {
    int64_t applied; int64_t skipped; int64_t reasons[8]; int64_t work_ns; char detail[320];
} nkat_stats;
typedef struct nkat_hook nkat_hook;
const char *nkat_abi_check(void);
nkat_hook *nkat_hook_new(int mode, int capacity);
void nkat_hook_free(nkat_hook *h);
int nkat_hook_add_factors(nkat_hook *h, const char *name, int64_t n_out, int64_t n_in, int64_t rank,
                          const int8_t *A_q, const float *A_s, const int8_t *Bt_q, const float *B_s);
int nkat_hook_add_target(nkat_hook *h, const char *name, int64_t n_in);
void nkat_hook_set_gamma(nkat_hook *h, float gamma);
float nkat_hook_get_gamma(const nkat_hook *h);
void nkat_hook_set_enabled(nkat_hook *h, int enabled);
void nkat_hook_set_threads(nkat_hook *h, int n_threads);
int nkat_hook_load_cuda(nkat_hook *h, const char *path, char *err, int err_len);
int nkat_hook_has_cuda(const nkat_hook *h);
void nkat_hook_stats(nkat_hook *h, nkat_stats *out, int reset);
const char *nkat_skip_name(int reason);
int nkat_hook_entry_count(const nkat_hook *h);
const char *nkat_hook_entry_name(const nkat_hook *h, int index);
int64_t nkat_hook_entry_n_in(const nkat_hook *h, int index);
int64_t nkat_hook_collected(const nkat_hook *h, int index, double *sum_sq);
uintptr_t nkat_cb_eval_address(void);
"""


def _rel(path: Path) -> str:
    """setuptools wants source paths relative to setup.py's directory (the working directory)."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else Path(rel).as_posix()


def make_builder() -> FFI:
    check_compiler()
    include, lib = llama_cpp_dirs()
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        MODULE,
        '#include "nkat_kernels.h"\n#include "nkat_hook.h"\n'
        "_Static_assert(NKAT_SKIP_COUNT == 8 && NKAT_DETAIL_LEN == 320, \"update CDEF in build_ffi.py\");\n",
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
