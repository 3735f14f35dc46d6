"""A llama.cpp model with theta attached, driven through llama-cpp-python's low-level API.

Backends:
  "lora" - llama.cpp's own adapter path (the .nkat is a stock GGUF LoRA adapter);
  "shim" - our native eval-callback hook (nkat_gguf.runtime.native) adding 0.5*gamma*theta*x after
           each matching matmul.
Gamma can be changed at any time without reloading: adapter scale for "lora", the hook's
gamma for "shim".
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..errors import BadSetting, Setting, UserError
from ..formats.gguf_io import ModelFile, open_gguf_magic
from .llama_log import captured_llama_log, relevant_lines
from .settings import BACKENDS, RuntimeSettings
from ..formats.nkat_format import NkatMeta, check_base_matches, check_fits_model, read_layout
from ..util.signals import raise_if_terminated

# NKAT_VERBOSE=1 shows llama.cpp's own log lines (model loading, adapters, quantizer).
LLAMA_VERBOSE = bool(os.environ.get("NKAT_VERBOSE"))


def _llama():
    import llama_cpp  # imported lazily: loading libllama takes a moment
    from llama_cpp import _logger

    if not LLAMA_VERBOSE:
        _logger.set_verbose(False)  # llama.cpp's log lines only at ERROR and above
    return llama_cpp


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


class Runtime:
    """One model, one context, optionally one theta; decode tokens and read logits."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        theta_path: str | os.PathLike | None = None,
        *,
        backend: str = "lora",
        gamma: float | None = None,
        n_ctx: int = 512,
        n_batch: int | None = None,
        n_threads: int | None = None,
        flash_attn: bool = False,
        n_gpu_layers: int = 0,
        eval_callback=None,
    ):
        if backend not in BACKENDS:
            raise BadSetting(Setting.BACKEND, f"must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.model_path = Path(model_path)
        open_gguf_magic(self.model_path)
        self.theta_path = Path(theta_path) if theta_path else None
        self.backend = backend if theta_path else None
        self.n_ctx = int(n_ctx)
        self.n_batch = int(n_batch or n_ctx)
        self.n_threads = int(n_threads or default_threads())
        self.flash_attn = bool(flash_attn)
        self.n_gpu_layers = int(n_gpu_layers)
        self.theta_meta: NkatMeta | None = None
        self.file_gamma: float | None = None
        if self.theta_path:
            self.theta_meta, pairs = read_layout(self.theta_path)
            self.file_gamma = float(self.theta_meta.theta_gamma)
            # Checked from the GGUF headers before llama.cpp loads the (possibly large) model.
            model_file = ModelFile(self.model_path)
            check_base_matches(self.theta_meta, model_file.identity(), self.theta_path)
            check_fits_model(pairs, model_file.tensors, self.theta_path)
            del model_file
        self.gamma = self.file_gamma if gamma is None else float(gamma)
        if self.gamma is not None and not np.isfinite(self.gamma):
            raise BadSetting(Setting.GAMMA, f"must be finite, not {gamma}")

        self._lib = _llama()
        self._adapter = None
        self._hook = None
        self._callback = eval_callback
        self._load_model()
        if self.backend == "shim":
            self._attach_shim()
        self._make_context()
        if self.backend == "lora":
            self._attach_lora()
        self._batch = self._lib.llama_batch_init(self.n_batch, 0, 1)

    @classmethod
    def from_settings(cls, model_path, theta_path, settings: RuntimeSettings, **overrides) -> Runtime:
        """A Runtime as `settings` say; `overrides` (gamma, n_ctx, n_batch, eval_callback) win."""
        kwargs = dict(backend=settings.backend, n_ctx=settings.ctx, n_threads=settings.threads,
                      flash_attn=settings.flash_attn, n_gpu_layers=settings.gpu_layers)
        return cls(model_path, theta_path, **(kwargs | overrides))

    # -- set-up -------------------------------------------------------------------------
    def _load_model(self) -> None:
        from llama_cpp._internals import LlamaModel

        params = self._lib.llama_model_default_params()
        params.n_gpu_layers = self.n_gpu_layers
        params.use_mmap = True
        try:
            self._model = LlamaModel(path_model=str(self.model_path), params=params, verbose=False)
        except ValueError as exc:
            raise UserError(f"{self.model_path}: llama.cpp could not load it ({exc})") from None
        self.vocab = self._lib.llama_model_get_vocab(self._model.model)
        self.n_vocab = int(self._lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(self._lib.llama_model_n_ctx_train(self._model.model))
        self.add_bos = bool(self._lib.llama_vocab_get_add_bos(self.vocab))
        self.bos_token = int(self._lib.llama_vocab_bos(self.vocab))
        if self.n_ctx > self.n_ctx_train:
            raise BadSetting(Setting.CTX, f"{self.n_ctx} is larger than the model's training context {self.n_ctx_train}")

    def _make_context(self) -> None:
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.no_perf = True
        params.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        callback = self._hook if self._hook is not None else self._callback
        if callback is not None:
            params.cb_eval = callback.cb_eval
            params.cb_eval_user_data = callback.user_data
        self._params = params  # keep the callback pointer alive with the context
        self._ctx = lib.llama_init_from_model(self._model.model, params)
        if not self._ctx:
            raise UserError(f"{self.model_path}: llama.cpp could not create a context (n_ctx {self.n_ctx})")
        self._memory = lib.llama_get_memory(self._ctx)

    def _attach_lora(self) -> None:
        from llama_cpp._utils import suppress_stdout_stderr

        lib = self._lib
        # ggml prints one "cannot use buft CPU_REPACK" warning per adapter tensor on stderr;
        # llama.cpp's own log lines are kept to explain a refusal.
        with suppress_stdout_stderr(disable=LLAMA_VERBOSE), captured_llama_log() as log:
            self._adapter = lib.llama_adapter_lora_init(self._model.model, str(self.theta_path).encode())
        if not self._adapter:
            why = " | ".join(relevant_lines(log)) or "it logged no reason"
            raise UserError(f"{self.theta_path}: llama.cpp refused the adapter: {why}")
        self._apply_lora_scale()

    def _apply_lora_scale(self) -> None:
        lib = self._lib
        # Clear first: llama_set_adapters_lora keeps the current set when it looks unchanged.
        lib.llama_set_adapters_lora(self._ctx, None, 0, None)
        if self.gamma == 0:
            return  # no adapter at all: the stock graph, bit-identical and at full speed
        scale = self.gamma / self.file_gamma
        adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self._adapter)
        scales = (ctypes.c_float * 1)(scale)
        if lib.llama_set_adapters_lora(self._ctx, adapters, 1, scales) != 0:
            raise UserError(f"{self.theta_path}: llama.cpp could not attach the adapter")

    def _attach_shim(self) -> None:
        # --- shim backend: owned by the native-shim work (nkat_gguf.runtime.native) ---
        from . import native
        from ..formats.nkat_format import read_nkat

        self._hook = native.ShimHook(read_nkat(self.theta_path), gamma=self.gamma, n_threads=self.n_threads,
                                     cuda=self.n_gpu_layers > 0)

    # -- use ----------------------------------------------------------------------------
    def set_gamma(self, gamma: float) -> None:
        """Change theta's strength without reloading anything."""
        if not np.isfinite(gamma):
            raise UserError(f"gamma must be finite, not {gamma}")
        if self.theta_path is None:
            raise UserError("no theta attached: nothing to set gamma on")
        self.gamma = float(gamma)
        if self.backend == "lora":
            self._apply_lora_scale()
        else:
            self._hook.set_gamma(self.gamma)

    def tokenize(self, text: bytes | str, add_bos: bool | None = None) -> np.ndarray:
        """Tokenize as llama.cpp's perplexity tool does (BOS where the vocab adds one)."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        add_special = self.add_bos if add_bos is None else add_bos
        capacity = len(data) + 16
        buf = (self._lib.llama_token * capacity)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, False)
        if n < 0:
            capacity = -n
            buf = (self._lib.llama_token * capacity)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, False)
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._memory, True)

    def decode(self, tokens, start_pos: int = 0, logits_from: int | None = None) -> np.ndarray | None:
        """Decode tokens at positions start_pos...; return logits (n, vocab) for positions
        >= logits_from (indexes into `tokens`), or None when no logits are asked for."""
        raise_if_terminated()  # a SIGTERM whose raise a llama.cpp log callback swallowed
        n = len(tokens)
        if n > self.n_batch:
            raise ValueError(f"{n} tokens exceed the batch size {self.n_batch}")
        batch = self._batch
        n_out = 0
        for i in range(n):
            batch.token[i] = int(tokens[i])
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            want = logits_from is not None and i >= logits_from
            batch.logits[i] = want
            n_out += want
        batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc}")
        if self._hook is not None:
            self._hook.check()
        if not n_out:
            return None
        ptr = self._lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def never_applied(self) -> list[str]:
        """Shim backend: theta tensors whose matmul was never corrected so far (at gamma 0 none
        is meant to be). The lora backend attaches every tensor or refuses the adapter."""
        if self._hook is None or self.gamma == 0:
            return []
        return self._hook.never_applied()

    def settings(self) -> dict:
        return {
            "model": str(self.model_path),
            "theta": str(self.theta_path) if self.theta_path else None,
            "backend": self.backend,
            "gamma": self.gamma,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "threads": self.n_threads,
            "flash_attn": self.flash_attn,
            "n_gpu_layers": self.n_gpu_layers,
        }

    def close(self) -> None:
        lib = self._lib
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_adapter", None):
            lib.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if getattr(self, "_hook", None) is not None:
            self._hook.close()
            self._hook = None
        if getattr(self, "_model", None) is not None:
            self._model.close()
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
