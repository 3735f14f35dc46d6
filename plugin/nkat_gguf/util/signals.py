"""SIGTERM and SIGHUP unwind like Ctrl-C: every `finally` runs, so partial files are removed,
scratch directories deleted and servers we started stopped (kill and logout included).

A signal that arrives while llama.cpp runs is handled when Python code next runs, which may be
inside a ctypes callback (llama.cpp's log callback): an exception raised there is printed and
dropped by ctypes. So the signal is also remembered, and raise_if_terminated() re-raises it at
the points that must not go on (before an output is renamed into place, before each decode
and each tensor read, after the command); and ctypes' report of the dropped exception (through
sys.unraisablehook) is kept quiet, so the user sees one line."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

CAUGHT = (signal.SIGTERM, signal.SIGHUP)
_received: int | None = None


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGHUP; handled wherever Ctrl-C is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def terminate_like_interrupt():
    """Within the block, SIGTERM/SIGHUP raise Terminated (once: a repeat during the clean-up is
    ignored so the clean-up finishes); outside it the previous handlers are back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in CAUGHT}

    global _received
    _received = None

    def handler(signum, frame):
        global _received
        _received = signum
        for sig in CAUGHT:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous_hook = sys.unraisablehook

    def quiet_when_remembered(unraisable):
        if not isinstance(unraisable.exc_value, Terminated):  # a Terminated is re-raised later
            previous_hook(unraisable)

    for sig in CAUGHT:
        signal.signal(sig, handler)
    sys.unraisablehook = quiet_when_remembered
    try:
        yield
        raise_if_terminated()
    finally:
        _received = None
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            signal.signal(sig, old)


def raise_if_terminated() -> None:
    """Raise Terminated if SIGTERM/SIGHUP arrived (even when its first raise was lost)."""
    if _received is not None:
        raise Terminated(_received)
