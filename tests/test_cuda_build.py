"""The CUDA kernels compile and link with nvcc (when present); runtime GPU checks need a GPU.
Also: the cffi build stops with a clear message when headers or a compiler are missing."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nkat_gguf.runtime import native

REPO = Path(__file__).resolve().parents[1]
NATIVE = REPO / "native"
sys.path.insert(0, str(NATIVE))
import build_cuda  # noqa: E402

needs_nvcc = pytest.mark.skipif(build_cuda.find_nvcc() is None, reason="nvcc not found: CUDA kernels cannot be built here")


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory) -> Path:
    out = build_cuda.build(tmp_path_factory.mktemp("cuda"), quiet=True)
    assert out is not None and out.is_file(), "nvcc is present but the CUDA source did not compile"
    return out


def hook_lookups() -> list[str]:
    """The names the shim's hook looks up in the CUDA library (dlsym in nkat_hook.c)."""
    return re.findall(r'dlsym\(lib, "(\w+)"\)', (NATIVE / "nkat_hook.c").read_text())


@needs_nvcc
def test_cuda_source_compiles_and_links(cuda_lib):
    lib = ctypes.CDLL(str(cuda_lib))  # loads: every symbol it uses resolves (cudart is linked in)
    needed = hook_lookups()
    assert "nkat_cuda_star_apply" in needed and "nkat_cuda_api_version" in needed, needed
    assert [name for name in needed if not hasattr(lib, name)] == []
    assert lib.nkat_cuda_api_version() == 2


@needs_nvcc
def test_hook_loads_the_cuda_library(cuda_lib):
    rng = np.random.default_rng(0)
    from nkat_gguf.formats.nkat_format import ThetaFactors

    f = ThetaFactors("blk.0.attn_q.weight", rng.standard_normal((2, 8)).astype(np.float32),
                     rng.standard_normal((8, 2)).astype(np.float32))
    hook = native.ShimHook({f.name: f}, gamma=1.0)
    err = native.ffi.new("char[512]")
    assert native.lib.nkat_hook_load_cuda(hook._h, str(cuda_lib).encode(), err, 512) == 0, native.ffi.string(err)
    assert native.lib.nkat_hook_has_cuda(hook._h) == 1
    assert native.lib.nkat_hook_load_cuda(hook._h, b"/nonexistent/libnkat_cuda.so", err, 512) != 0
    assert native.lib.nkat_hook_has_cuda(hook._h) == 1  # a failed load keeps the working one
    hook.close()


def cudart() -> ctypes.CDLL:
    nvcc = Path(build_cuda.find_nvcc()).resolve()
    for lib_dir in ("lib64", "lib", "targets/x86_64-linux/lib"):
        for path in sorted((nvcc.parent.parent / lib_dir).glob("libcudart.so*")):
            return ctypes.CDLL(str(path))
    pytest.skip("libcudart.so not found beside nvcc")


@needs_nvcc
def test_cuda_kernel_matches_numpy(cuda_lib):
    lib = ctypes.CDLL(str(cuda_lib))
    if lib.nkat_cuda_device_count() < 1:
        pytest.skip("no CUDA device: the CUDA kernel compiles and links, but cannot run here")
    rt = cudart()
    rng = np.random.default_rng(0)
    f = native.quantize_factors(rng.standard_normal((5, 300)), rng.standard_normal((129, 5)))
    x = rng.standard_normal((3, 300)).astype(np.float32)
    y = rng.standard_normal((3, 129)).astype(np.float32)
    arrays = [f.A_q, f.A_scale, f.tiled_b(), f.B_scale, x, y]
    dev = []
    for a in arrays:
        p = ctypes.c_void_p()
        assert rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(a.nbytes)) == 0
        assert rt.cudaMemcpy(p, a.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(a.nbytes), 1) == 0
        dev.append(p)
    lib.nkat_cuda_star_apply.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_void_p,
                                                                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
    rc = lib.nkat_cuda_star_apply(129, 300, 5, *dev[:5], 300, dev[5], 129, 3, 0.7)
    assert rc == 0
    out = np.empty_like(y)
    assert rt.cudaMemcpy(out.ctypes.data_as(ctypes.c_void_p), dev[5], ctypes.c_size_t(out.nbytes), 2) == 0
    for p in dev:
        rt.cudaFree(p)
    assert native.relative_error(out.astype(np.float64) - y, native.reference(f, x, 0.7)) < 1e-5


def run_builder(env_extra: dict, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    code = "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]); import build_ffi"
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code, str(extra_path or NATIVE), str(NATIVE)],
                          capture_output=True, text=True, env=env, cwd=REPO)


def test_build_without_headers_fails_clearly(tmp_path):
    fake = tmp_path / "site"
    (fake / "llama_cpp" / "lib").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text("")
    proc = run_builder({}, extra_path=fake)
    assert proc.returncode != 0
    assert "cannot build the native shim" in proc.stderr and "ggml.h" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_without_compiler_fails_clearly():
    proc = run_builder({"CC": "/nonexistent/bin/cc"})
    assert proc.returncode != 0
    assert "cannot build the native shim: no C compiler" in proc.stderr


def test_installed_module_is_compiled_against_this_llama_cpp():
    assert native.abi_problem() is None
