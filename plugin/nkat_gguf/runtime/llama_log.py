"""llama.cpp's log lines captured around one call, to explain why it failed in our one line."""

from __future__ import annotations

import contextlib
import ctypes

# enum ggml_log_level in the ggml.h that llama-cpp-python 0.3.36 installs: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR,
# 5 CONT (continues the previous line). (llama_cpp._logger's table is from an older ggml.)
_WARN, _ERROR, _CONT = 3, 4, 5
# One line per adapter tensor on CPU builds: not a reason for anything.
_NOISE = ("cannot use buft",)


@contextlib.contextmanager
def captured_llama_log():
    """Collect llama.cpp/ggml log records [(level, text)] while the block runs, then give the
    logging back to llama-cpp-python's own callback."""
    import llama_cpp
    from llama_cpp import _logger

    records: list[tuple[int, str]] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        records.append((int(level), (text or b"").decode("utf-8", "replace")))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield records
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def relevant_lines(records: list[tuple[int, str]], limit: int = 3) -> list[str]:
    """The warning and error lines (continuations joined), without per-tensor noise."""
    lines, level = [], 0
    for lvl, text in records:
        if lvl == _CONT and lines and level >= _WARN:
            lines[-1] += text
            continue
        level = lvl
        if lvl in (_WARN, _ERROR):
            lines.append(text)
    out = [" ".join(l.split()) for l in lines if l.strip() and not any(n in l for n in _NOISE)]
    return out[-limit:]
