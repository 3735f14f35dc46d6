"""Build the optional CUDA kernel library (libnkat_cuda.so) with nvcc, when nvcc exists.

    python native/build_cuda.py [OUT_DIR]      # default: plugin/nkat_gguf/

setup.py calls build() after the cffi module; a missing nvcc or a failed compile is reported
and skipped (the CPU shim never needs this library). NKAT_NO_CUDA=1 skips it;
NKAT_CUDA_ARCH (e.g. "sm_86") picks the GPU architecture, nvcc's default otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "nkat_cuda.cu"
LIB_NAME = "libnkat_cuda.so"


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc")):
        if candidate and Path(candidate).is_file():
            return candidate
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def nvcc_command(nvcc: str, out: Path) -> list[str]:
    cmd = [nvcc, "-O3", "-shared", "-std=c++17", "-Xcompiler", "-fPIC", "-I", str(HERE)]
    arch = os.environ.get("NKAT_CUDA_ARCH")
    if arch:
        cmd += [f"-arch={arch}"]
    return cmd + ["-o", str(out), str(SOURCE)]  # cudart linked statically (nvcc default)


def build(out_dir: str | os.PathLike, *, quiet: bool = False) -> Path | None:
    """Compile into out_dir; returns the library path, or None when skipped or failed."""
    def say(msg: str) -> None:
        if not quiet:
            print(f"nkat-gguf: {msg}", file=sys.stderr)

    if os.environ.get("NKAT_NO_CUDA"):
        say("CUDA kernels skipped (NKAT_NO_CUDA is set)")
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        say("nvcc not found: CUDA kernels not built (the CPU shim does not need them)")
        return None
    out = Path(out_dir) / LIB_NAME
    tmp = out.with_name(out.name + ".partial")
    proc = subprocess.run(nvcc_command(nvcc, tmp), capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        say(f"nvcc failed, CUDA kernels not built:\n{proc.stderr.strip()[-2000:]}")
        return None
    os.replace(tmp, out)
    say(f"CUDA kernels built: {out}")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "plugin" / "nkat_gguf"
    sys.exit(0 if build(target) else 1)
