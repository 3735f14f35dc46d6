"""Child processes that die with us, and long native calls run in one so a signal stops them.

A `kill -9` of nkat cannot be caught, so a server or worker it started would live on under PID 1.
On Linux the child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG, set between
fork and exec). The kernel sends it when the *thread* that forked exits: start children from the
main thread (every command does).

A signal that arrives while llama.cpp runs a long call (a quantization: minutes) is handled only
when the call returns. run_in_child runs such a call in a child process instead; the parent waits,
and on Ctrl-C, SIGTERM or SIGHUP kills the child at once and unwinds as usual.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(ignore_sigint: bool = False):
    """A preexec_fn for subprocess.Popen: the child gets SIGKILL when this process dies; with
    `ignore_sigint`, a Ctrl-C at the terminal (sent to the whole foreground group) leaves the child
    to its parent, which stops it."""
    prctl = _prctl()  # looked up here: between fork and exec the child should do as little as possible
    parent = os.getpid()

    def in_child() -> None:
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)

    return in_child


# Runs in the child: the parent's import path (so the same copy of the package is imported), then
# module.function(payload); its return value is the exit status.
_BOOT = ("import importlib, json, sys\n"
         "path, module, function, payload = json.loads(sys.argv[1])\n"
         "sys.path[:] = path\n"
         "sys.exit(getattr(importlib.import_module(module), function)(payload))\n")


def run_in_child(module: str, function: str, payload: dict) -> int:
    """`module.function(payload)` in a child Python process (payload: JSON); its exit status
    (negative: killed by that signal). A KeyboardInterrupt here (Ctrl-C, or SIGTERM/SIGHUP through
    util.signals) kills the child before it propagates."""
    argv = [sys.executable, "-c", _BOOT, json.dumps([sys.path, module, function, payload])]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(ignore_sigint=True))
    try:
        return process.wait()
    finally:
        if process.poll() is None:  # interrupted: stop it now, not when its native call returns
            process.kill()
            process.wait()
