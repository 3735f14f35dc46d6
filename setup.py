"""Build of the native shim (cffi) and, where nvcc exists, its optional CUDA kernels.

Everything else about the package lives in pyproject.toml. Install with llama-cpp-python
already present, so the build sees its headers:

    pip install --no-build-isolation -e .
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent / "native"))


class BuildExtWithCuda(build_ext):
    """build_ext, then libnkat_cuda.so beside the cffi module (skipped without nvcc)."""

    def run(self):
        super().run()
        import build_cuda

        out_dir = Path(self.get_ext_fullpath("nkat_gguf._nkat_native")).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_cuda.build(out_dir)


setup(
    cffi_modules=["native/build_ffi.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtWithCuda},
)
