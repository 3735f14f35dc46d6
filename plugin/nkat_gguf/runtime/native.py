"""The cffi binding of native/: INT8 star-product kernels and the llama.cpp eval-callback hook.

Factors are held as per-row INT8 (symmetric, scale = max|row| / 127):
    A[k, i] ~ A_q[k, i] * A_scale[k]        B[o, k] ~ B_q[o, k] * B_scale[o]
so every element is within half a step, |error| <= max|row| / 254, of the float factor read
from the .nkat (which may itself be Q8_0, whose blocks of 32 have their own scales).

Hooks (ShimHook applies theta, ActivationCollector gathers imatrix statistics) hand llama.cpp a
C function pointer (`cb_eval`) and a `user_data` pointer; keep the hook object alive as long as
the llama.cpp context that uses it, and call `check()` after each decode.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..formats.nkat_format import applied_scale

try:
    from .._nkat_native import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "nkat_gguf's native shim is not built (nkat_gguf._nkat_native is missing): install the "
        "package with llama-cpp-python present: pip install --no-build-isolation -e ."
        f" ({exc})"
    ) from exc

ISAS = ("scalar", "avx2", "avx512")
MAX_RANK = int(lib.NKAT_MAX_RANK)
CUDA_LIB_NAME = "libnkat_cuda.so"
_MODE_APPLY, _MODE_COLLECT, _MODE_CAPTURE = 0, 1, 2
_SKIP_REASONS = [ffi.string(lib.nkat_skip_name(i)).decode() for i in range(lib.NKAT_SKIP_COUNT)]


# ------------------------------------------------------------------ factors and kernel --

@dataclass
class Int8Factors:
    """One weight's theta = B @ A as per-row INT8; B is kept transposed (rank, n_out)."""

    name: str
    A_q: np.ndarray      # int8 (rank, n_in)
    A_scale: np.ndarray  # float32 (rank,)
    Bt_q: np.ndarray     # int8 (rank, n_out)
    B_scale: np.ndarray  # float32 (n_out,)

    @property
    def rank(self) -> int:
        return int(self.A_q.shape[0])

    @property
    def n_in(self) -> int:
        return int(self.A_q.shape[1])

    @property
    def n_out(self) -> int:
        return int(self.Bt_q.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the factors and scales (what the kernel streams per input column)."""
        return self.A_q.nbytes + self.Bt_q.nbytes + self.A_scale.nbytes + self.B_scale.nbytes

    def tiled_b(self) -> np.ndarray:
        """B in the kernels' layout: tiles of NKAT_TILE outputs, [n_tiles][rank][NKAT_TILE] (cached)."""
        cached = getattr(self, "_tiled", None)
        if cached is None:
            plain = np.ascontiguousarray(self.Bt_q, dtype=np.int8)
            cached = np.empty(int(lib.nkat_tiled_b_size(self.rank, self.n_out)), np.int8)
            lib.nkat_tile_b(ffi.from_buffer("int8_t[]", plain), self.rank, self.n_out,
                            ffi.from_buffer("int8_t[]", cached))
            self._tiled = cached
        return cached

    def A(self) -> np.ndarray:
        return self.A_q.astype(np.float32) * self.A_scale[:, None]

    def B(self) -> np.ndarray:
        return (self.Bt_q.astype(np.float32) * self.B_scale[None, :]).T


def quantize_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row INT8: (q int8, scale float32) with m ~ q * scale[:, None]."""
    m = np.asarray(m, dtype=np.float32)
    if m.ndim != 2 or not np.isfinite(m).all():
        raise UserError(f"theta factor must be a finite 2-D array (got shape {m.shape})")
    peak = np.abs(m).max(axis=1)
    scale = (peak / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(m / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_factors(A: np.ndarray, B: np.ndarray, name: str = "") -> Int8Factors:
    """A (rank, n_in), B (n_out, rank) float -> per-row INT8 factors for the kernels."""
    A = np.asarray(A, np.float32)
    B = np.asarray(B, np.float32)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise UserError(f"{name or 'theta'}: A {A.shape} and B {B.shape} do not multiply (B @ A)")
    if not 1 <= A.shape[0] <= MAX_RANK:
        raise UserError(f"{name or 'theta'}: rank {A.shape[0]} outside 1..{MAX_RANK}")
    A_q, A_scale = quantize_rows(A)
    B_q, B_scale = quantize_rows(B)
    return Int8Factors(name, A_q, A_scale, np.ascontiguousarray(B_q.T), B_scale)


def _columns(a: np.ndarray, length: int, what: str, writable: bool = False) -> np.ndarray:
    """A float32 C-contiguous (n_cols, length) view of a 1-D or 2-D array (no copy)."""
    if a.dtype != np.float32 or not a.flags.c_contiguous or (writable and not a.flags.writeable):
        raise ValueError(f"{what} must be a {'writable ' if writable else ''}C-contiguous float32 array")
    cols = a.reshape(-1, length) if a.ndim == 1 else a
    if cols.ndim != 2 or cols.shape[1] != length:
        raise ValueError(f"{what} has shape {a.shape}; expected (n_cols, {length})")
    return cols


def _factor_struct(f: Int8Factors, keep: list):
    arrays = [np.ascontiguousarray(a) for a in (f.A_q, f.A_scale, f.tiled_b(), f.B_scale)]
    keep.extend(arrays)
    s = ffi.new("nkat_factors *")
    s.n_out, s.n_in, s.rank = f.n_out, f.n_in, f.rank
    s.A_q = ffi.from_buffer("int8_t[]", arrays[0])
    s.A_s = ffi.from_buffer("float[]", arrays[1])
    s.Bt_q = ffi.from_buffer("int8_t[]", arrays[2])
    s.B_s = ffi.from_buffer("float[]", arrays[3])
    return s


def star_apply_factors(f: Int8Factors, x: np.ndarray, y: np.ndarray, s: float, threads: int | None = None) -> np.ndarray:
    """y += s * B (A x) in place, for x (n_cols, n_in) and y (n_cols, n_out) float32 (one row per
    token, as ggml stores columns); 1-D x/y are one column. Returns y."""
    xc = _columns(x, f.n_in, "x")
    yc = _columns(y, f.n_out, "y", writable=True)
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(f"x has {xc.shape[0]} columns but y has {yc.shape[0]}")
    keep: list = []
    fs = _factor_struct(f, keep)
    n_threads = int(threads or os.cpu_count() or 1)
    rc = lib.nkat_star_apply(fs, ffi.from_buffer("float[]", xc), f.n_in, ffi.from_buffer("float[]", yc), f.n_out,
                             xc.shape[0], float(s), n_threads)
    if rc != 0:
        raise ValueError("nkat_star_apply refused its arguments")
    return y


def reference(f: Int8Factors, x: np.ndarray, s: float) -> np.ndarray:
    """numpy float64 s * B (A x) for x (n_cols, n_in): the kernel's expected delta."""
    A = f.A_q.astype(np.float64) * f.A_scale.astype(np.float64)[:, None]
    Bt = f.Bt_q.astype(np.float64) * f.B_scale.astype(np.float64)[None, :]
    return s * ((np.atleast_2d(x).astype(np.float64) @ A.T) @ Bt)


def isa() -> str:
    return ffi.string(lib.nkat_isa_name()).decode()


def best_isa() -> str:
    return ISAS[lib.nkat_isa_best()]


def supported_isas() -> list[str]:
    return list(ISAS[: lib.nkat_isa_best() + 1])


@contextlib.contextmanager
def use_isa(name: str):
    """Run the kernels with one ISA; raises ValueError if this CPU lacks it. Test API: used by
    the tests and benchmarks/bench_kernel.py, not by the package."""
    previous = isa()
    if name not in ISAS or lib.nkat_isa_set(ISAS.index(name)) != 0:
        raise ValueError(f"ISA {name!r} is not supported here (supported: {', '.join(supported_isas())})")
    try:
        yield
    finally:
        lib.nkat_isa_set(ISAS.index(previous))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    return err / scale if scale > 0 else err


def self_test(seed: int = 0, tolerance: float = 1e-5) -> dict:
    """Kernel vs numpy on random factors (odd sizes, rank 1 and 64, batches of 1 and 37)."""
    rng = np.random.default_rng(seed)
    cases = [(1, 1, 1, 1), (7, 33, 1, 3), (576, 576, 8, 1), (193, 1537, 64, 37), (1536, 576, 32, 5), (64, 100, 3, 16)]
    worst = 0.0
    for n_out, n_in, rank, n_cols in cases:
        f = quantize_factors(rng.standard_normal((rank, n_in)), rng.standard_normal((n_out, rank)))
        x = rng.standard_normal((n_cols, n_in)).astype(np.float32)
        y0 = rng.standard_normal((n_cols, n_out)).astype(np.float32)
        y = star_apply_factors(f, x, y0.copy(), 0.37, threads=2)
        worst = max(worst, relative_error(y.astype(np.float64) - y0, reference(f, x, 0.37)))
    abi = lib.nkat_abi_check()
    return {
        "ok": bool(worst <= tolerance and abi == ffi.NULL),
        "max_rel_err": worst,
        "tolerance": tolerance,
        "isa": isa(),
        "isa_best": best_isa(),
        "cases": len(cases),
        "abi": "ok" if abi == ffi.NULL else ffi.string(abi).decode(),
        "cuda_library": str(cuda_library_path()) if cuda_library_path() else None,
    }


# ------------------------------------------------------------------ CUDA library --------

def cuda_library_path() -> Path | None:
    """libnkat_cuda.so beside this module (built at install time when nvcc was present)."""
    path = Path(__file__).resolve().parents[1] / CUDA_LIB_NAME  # beside _nkat_native
    return path if path.is_file() else None



# ------------------------------------------------------------------ hooks ---------------

def abi_problem() -> str | None:
    """None when the loaded libggml matches the headers the shim was compiled against."""
    msg = lib.nkat_abi_check()
    return None if msg == ffi.NULL else ffi.string(msg).decode()


class _Hook:
    """Owns one native nkat_hook; exposes what llama_context_params needs."""

    def __init__(self, mode: int, capacity: int, n_threads: int | None):
        problem = abi_problem()
        if problem:
            raise RuntimeError(problem)
        self._h = lib.nkat_hook_new(mode, max(1, capacity))
        if self._h == ffi.NULL:
            raise MemoryError("nkat_hook_new failed")
        self._cb = None
        self._totals = {"applied": 0, "skipped": 0, "work_seconds": 0.0, "reasons": {}, "detail": ""}
        lib.nkat_hook_set_threads(self._h, int(n_threads or os.cpu_count() or 1))

    def _handle(self):
        if self._h is None:
            raise RuntimeError("the hook is closed")
        return self._h

    def _register(self, rc: int, name: str) -> None:
        if rc == -2:
            raise UserError(f"{name}: registered twice (or more weights than the hook was sized for)")
        if rc == -3:
            raise MemoryError(f"{name}: out of memory registering theta")
        if rc < 0:
            raise UserError(f"{name}: not a valid weight name or shape for the native hook")

    @property
    def cb_eval(self):
        """A llama_cpp.ggml_backend_sched_eval_callback pointing at the C callback."""
        if self._cb is None:
            import llama_cpp

            self._cb = llama_cpp.ggml_backend_sched_eval_callback(int(lib.nkat_cb_eval_address()))
        return self._cb

    @property
    def user_data(self) -> ctypes.c_void_p:
        return ctypes.c_void_p(int(ffi.cast("uintptr_t", self._handle())))

    def set_threads(self, n_threads: int) -> None:
        lib.nkat_hook_set_threads(self._handle(), int(n_threads))

    def enable(self) -> None:
        lib.nkat_hook_set_enabled(self._handle(), 1)

    def disable(self) -> None:
        lib.nkat_hook_set_enabled(self._handle(), 0)

    def names(self) -> list[str]:
        h = self._handle()
        return [ffi.string(lib.nkat_hook_entry_name(h, i)).decode() for i in range(lib.nkat_hook_entry_count(h))]

    def _native_stats(self, reset: bool) -> dict:
        out = ffi.new("nkat_stats *")
        lib.nkat_hook_stats(self._handle(), out, 1 if reset else 0)
        reasons = {name: int(out.reasons[i]) for i, name in enumerate(_SKIP_REASONS) if out.reasons[i]}
        return {"applied": int(out.applied), "skipped": int(out.skipped), "reasons": reasons,
                "work_seconds": int(out.work_ns) * 1e-9, "detail": ffi.string(out.detail).decode(errors="replace")}

    def stats(self) -> dict:
        """Totals since the hook was made: {"applied", "skipped", "work_seconds" (inside the
        callback), "reasons": {reason: count}, "detail": the first skip in words}; check() does
        not reset these."""
        now = self._native_stats(reset=False)
        total = dict(self._totals)
        for key in ("applied", "skipped", "work_seconds"):
            total[key] += now[key]
        total["reasons"] = dict(total["reasons"])
        for k, v in now["reasons"].items():
            total["reasons"][k] = total["reasons"].get(k, 0) + v
        total["detail"] = total["detail"] or now["detail"]
        return total

    def check(self) -> dict:
        """Raise if nodes were skipped since the last check; returns that period's stats."""
        st = self._native_stats(reset=True)
        for key in ("applied", "skipped", "work_seconds"):
            self._totals[key] += st[key]
        for k, v in st["reasons"].items():
            self._totals["reasons"][k] = self._totals["reasons"].get(k, 0) + v
        self._totals["detail"] = self._totals["detail"] or st["detail"]
        if st["skipped"]:
            reasons = ", ".join(f"{k} {v}" for k, v in st["reasons"].items())
            message = f"native shim skipped {st['skipped']} matmul(s) ({reasons}); first: {st['detail']}"
            if set(st["reasons"]) == {"shape"}:
                raise UserError(f"theta does not fit this model: {message}")
            raise RuntimeError(message)
        return st

    def close(self) -> None:
        if getattr(self, "_h", None) is not None:
            lib.nkat_hook_free(self._h)
            self._h = None

    def __del__(self):
        self.close()


class ShimHook(_Hook):
    """Adds applied_scale(gamma) * theta @ x (0.5 * gamma: formats.nkat_format) after every
    MUL_MAT whose weight has a registered theta.

    gamma=None takes the file's gamma; gamma 0 (or disable()) leaves the graph untouched, so
    the logits are bit-identical to the base model. cuda=True loads libnkat_cuda.so for
    tensors in device memory (without it such nodes are skipped and reported by check())."""

    def __init__(self, nkat, gamma: float | None = None, n_threads: int | None = None, cuda: bool = False):
        factors = getattr(nkat, "factors", nkat)
        super().__init__(_MODE_APPLY, len(factors), n_threads)
        try:
            self.theta_bytes = 0  # INT8 factors + scales held by the native registry
            for name, tf in factors.items():
                f = quantize_factors(tf.A, tf.B, name)
                self._add(f)
                self.theta_bytes += f.nbytes
            file_gamma = getattr(nkat, "gamma", None)
            self.set_gamma(file_gamma if gamma is None else gamma)
            if cuda:
                self.load_cuda()
        except BaseException:
            self.close()
            raise

    def _add(self, f: Int8Factors) -> None:
        keep = [np.ascontiguousarray(a) for a in (f.A_q, f.A_scale, f.Bt_q, f.B_scale)]
        rc = lib.nkat_hook_add_factors(
            self._handle(), f.name.encode(), f.n_out, f.n_in, f.rank,
            ffi.from_buffer("int8_t[]", keep[0]), ffi.from_buffer("float[]", keep[1]),
            ffi.from_buffer("int8_t[]", keep[2]), ffi.from_buffer("float[]", keep[3]))
        self._register(rc, f.name)

    @property
    def gamma(self) -> float:
        return self._gamma

    def set_gamma(self, gamma: float | None) -> None:
        if gamma is None or not np.isfinite(gamma):
            raise UserError(f"gamma must be a finite number, not {gamma}")
        lib.nkat_hook_set_scale(self._handle(), applied_scale(gamma))  # the hook applies what it is given
        self._gamma = float(gamma)

    def never_applied(self) -> list[str]:
        """Registered weights whose matmul was never corrected since the hook was made."""
        h = self._handle()
        return [ffi.string(lib.nkat_hook_entry_name(h, i)).decode()
                for i in range(lib.nkat_hook_entry_count(h)) if lib.nkat_hook_entry_uses(h, i) == 0]

    def load_cuda(self) -> None:
        path = cuda_library_path()
        if path is None:
            raise UserError("the CUDA kernels were not built (no nvcc at install time): reinstall with nvcc on PATH")
        err = ffi.new("char[512]")
        if lib.nkat_hook_load_cuda(self._handle(), str(path).encode(), err, 512) != 0:
            raise RuntimeError(f"could not load {path}: {ffi.string(err).decode(errors='replace')}")


class ActivationCollector(_Hook):
    """Per weight: the sum of x_i^2 over every input column of its MUL_MAT, and the column count
    (what llama.cpp's imatrix stores). `targets` maps weight name -> n_in."""

    def __init__(self, targets: dict[str, int], n_threads: int | None = None):
        super().__init__(_MODE_COLLECT, len(targets), n_threads)
        try:
            for name, n_in in targets.items():
                self._register(lib.nkat_hook_add_target(self._handle(), name.encode(), int(n_in)), name)
        except BaseException:
            self.close()
            raise

    def results(self) -> dict[str, tuple[np.ndarray, int]]:
        """name -> (sum of x^2 per input column, float32 (n_in,), number of columns); weights
        that saw no input are left out."""
        h = self._handle()
        out = {}
        for i in range(lib.nkat_hook_entry_count(h)):
            n_in = int(lib.nkat_hook_entry_n_in(h, i))
            buf = np.zeros(n_in, np.float64)
            count = int(lib.nkat_hook_collected(h, i, ffi.from_buffer("double[]", buf)))
            if count > 0:
                out[ffi.string(lib.nkat_hook_entry_name(h, i)).decode()] = (buf.astype(np.float32), count)
        return out


class CovarianceCollector(_Hook):
    """Per input: the sum of x x^T over every input column and the column count.

    The C hook copies each registered weight's input columns into a float32 buffer while
    llama.cpp decodes; after each decode, add_captured() sums X^T X of those columns with BLAS
    (float32 per decode, as numpy's syrk) into a float64 accumulator. `targets` maps the weight
    whose input is collected -> n_in; `columns` is the most columns one decode may produce.
    """

    def __init__(self, targets: dict[str, int], columns: int, n_threads: int | None = None):
        super().__init__(_MODE_CAPTURE, len(targets), n_threads)
        try:
            self._buffers, self.sums, self.counts = {}, {}, {}
            for name, n_in in targets.items():
                buf = np.zeros((int(columns), int(n_in)), np.float32)
                rc = lib.nkat_hook_add_capture(self._handle(), name.encode(), int(n_in),
                                               ffi.from_buffer("float[]", buf), int(columns))
                self._register(rc, name)
                self._buffers[name] = buf
                self.sums[name] = np.zeros((int(n_in), int(n_in)), np.float64)
                self.counts[name] = 0
        except BaseException:
            self.close()
            raise

    @staticmethod
    def bytes_needed(targets: dict[str, int], columns: int) -> int:
        """Memory one collector holds: float64 sums plus float32 capture buffers."""
        return sum(8 * n * n + 4 * columns * n for n in targets.values())

    def add_captured(self) -> None:
        """Sum the columns captured since the last call into `sums`, then empty the buffers."""
        h = self._handle()
        for i in range(lib.nkat_hook_entry_count(h)):
            name = ffi.string(lib.nkat_hook_entry_name(h, i)).decode()
            k = int(lib.nkat_hook_captured(h, i))
            if k > 0:
                X = self._buffers[name][:k]
                self.sums[name] += X.T @ X
                self.counts[name] += k
        lib.nkat_hook_capture_reset(h)

    def results(self) -> dict[str, tuple[np.ndarray, int]]:
        """name -> (sum of x x^T, float64 (n_in, n_in), number of columns); inputs that saw
        nothing are left out."""
        return {name: (self.sums[name], self.counts[name]) for name in self.sums if self.counts[name] > 0}

    def close(self) -> None:
        super().close()
        self._buffers = {}
