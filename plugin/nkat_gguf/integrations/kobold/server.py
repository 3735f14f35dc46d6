"""Run a server for an NKAT model and check it answers: KoboldCpp started with --config, or the
embedded fallback, llama-cpp-python's OpenAI-compatible server serving base + theta.

Processes are started from argument lists in their own session, bound to 127.0.0.1 unless the
caller says otherwise, waited for with a deadline, and stopped by their own process id; on Linux
they die with nkat even when it is killed with SIGKILL (util.child.die_with_parent).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError
from ...util.child import die_with_parent

SERVER_EXTRAS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
SERVER_EXTRAS_PIP = "pip install fastapi uvicorn sse-starlette starlette-context pydantic-settings"
SMOKE_PROMPT = "The capital of France is"
LOG_TAIL_LINES = 15

# Loopback requests must never go through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StartupError(UserError):
    """The server exited or never answered; carries the tail of its log."""

    def __init__(self, message: str, log_tail: list[str]):
        super().__init__(message)
        self.log_tail = log_tail


@dataclass
class RunningServer:
    kind: str                         # "koboldcpp" or "llama-cpp-python"
    process: subprocess.Popen
    host: str
    port: int
    log_path: Path
    cleanup: list[Path] = field(default_factory=list)   # files to delete once stopped

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group we created, SIGKILL after `timeout`."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        for path in self.cleanup:
            with contextlib.suppress(OSError):
                path.unlink()


def _signal_group(pid: int, sig: int) -> None:
    # The server runs in its own session (start_new_session), so its group id is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# ---------------------------------------------------------------- ports

def port_in_use(host: str, port: int) -> bool:
    """True when something listens there (SO_REUSEADDR: closed connections in TIME_WAIT don't count,
    as they don't stop a server that sets it, like KoboldCpp's and uvicorn's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: not a TCP port")
    if port_in_use(host, port):
        raise UserError(f"port {port} on {host} is in use: pick another with --port")


# ---------------------------------------------------------------- starting

def _spawn(kind: str, argv: list[str], host: str, port: int, log_path: Path, cleanup=None) -> RunningServer:
    log = open(log_path, "ab")
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=die_with_parent())
    except OSError as exc:
        raise UserError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
    finally:
        log.close()
    return RunningServer(kind, process, host, port, log_path, list(cleanup or []))


def start_koboldcpp(command: list[str], config: Path, host: str, port: int, log_path: Path,
                    cleanup=None) -> RunningServer:
    """KoboldCpp reads everything (model, lora, backend, host, port) from the .kcpps."""
    check_port(host, port)
    return _spawn("koboldcpp", command + ["--config", str(config)], host, port, log_path, cleanup)


def server_extras_missing() -> list[str]:
    return [name for name in SERVER_EXTRAS if importlib.util.find_spec(name) is None]


def llama_server_argv(model: Path, theta: Path | None, host: str, port: int, n_ctx: int,
                      threads: int, gpu_layers: int) -> list[str]:
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--host", host, "--port", str(port), "--n_ctx", str(n_ctx),
            "--n_threads", str(threads), "--n_gpu_layers", str(gpu_layers)]
    if theta is not None:
        argv += ["--lora_path", str(theta)]
    return argv


def start_llama_server(model: Path, theta: Path | None, host: str, port: int, log_path: Path,
                       n_ctx: int = 512, threads: int = 1, gpu_layers: int = 0) -> RunningServer:
    missing = server_extras_missing()
    if missing:
        raise UserError(f"llama-cpp-python's server needs {', '.join(missing)}: {SERVER_EXTRAS_PIP}")
    check_port(host, port)
    argv = llama_server_argv(model, theta, host, port, n_ctx, threads, gpu_layers)
    return _spawn("llama-cpp-python", argv, host, port, log_path)


# ---------------------------------------------------------------- HTTP

def http_json(url: str, payload: dict | None = None, timeout: float = 60.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def ready_path(kind: str) -> str:
    return "/api/v1/model" if kind == "koboldcpp" else "/v1/models"


def wait_ready(server: RunningServer, timeout: float) -> float:
    """Poll until the model endpoint answers; seconds taken. Stops the server on failure."""
    start = time.monotonic()
    url = server.url + ready_path(server.kind)
    while True:
        code = server.process.poll()
        if code is not None:
            tail = server.log_tail()
            server.stop()
            raise StartupError(f"{server.kind} exited with status {code} during start-up "
                               f"(log: {server.log_path})", tail)
        with contextlib.suppress(OSError, ValueError):
            http_json(url, timeout=2.0)
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            tail = server.log_tail()
            server.stop()
            raise StartupError(f"{server.kind} did not answer {url} within {timeout:.0f} s "
                               f"(log: {server.log_path})", tail)
        time.sleep(0.25)


def generate(server: RunningServer, prompt: str = SMOKE_PROMPT, max_tokens: int = 16,
             timeout: float = 120.0) -> str:
    """A short greedy generation through the server's own API."""
    if server.kind == "koboldcpp":
        # top_k 1 is greedy in KoboldCpp whatever the temperature; rep_pen 1 leaves logits alone.
        payload = {"prompt": prompt, "max_length": max_tokens, "temperature": 0.1, "top_k": 1,
                   "rep_pen": 1.0, "sampler_seed": 1}
        answer = http_json(server.url + "/api/v1/generate", payload, timeout)
        return answer["results"][0]["text"]
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 1}
    answer = http_json(server.url + "/v1/completions", payload, timeout)
    return answer["choices"][0]["text"]
