"""The steps of `nkat kobold`: find models, launcher and GPU, choose a backend, register .kcpps
configs, start a server, wait for it and generate once, as KoboldOptions ask."""

from __future__ import annotations

import getpass
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError
from ...formats.defaults import default_models_dir
from ...util.output_paths import check_output_path
from ...util.report import say
from . import config as kobold_config
from . import discovery as kobold
from . import server as kobold_server

DEFAULT_TIMEOUT_S = 180.0
SMOKE_MAX_TOKENS = 16


@dataclass
class KoboldOptions:
    """What `nkat kobold` was asked: what to serve, what to do, and how the server runs."""

    models_dir: str | None = None  # None: formats.defaults.default_models_dir()
    theta: list[str] | None = None  # .nkat files (replace the models directory scan)
    model: str | None = None  # base model for the .nkat files
    koboldcpp: str | None = None
    backend: str | None = None  # None: chosen from the launcher and the GPU
    register: bool = False
    admindir: str | None = None
    launch: bool = False
    smoke_only: bool = False
    menu: bool = False
    host: str = "127.0.0.1"
    port: int = kobold.DEFAULT_PORT
    context_size: int = kobold.DEFAULT_CONTEXT
    threads: int = kobold_config.RunSettings.threads
    gpu_layers: int | None = None
    lora_mult: float = 1.0
    timeout: float = DEFAULT_TIMEOUT_S
    log: str | None = None
    prompt: str = kobold_server.SMOKE_PROMPT
    max_tokens: int = SMOKE_MAX_TOKENS
    admin_password_env: str = kobold.ADMIN_PASSWORD_ENV
    json: bool = False
    quiet: bool = False
    setting_flags: dict = field(default_factory=dict)  # how the command words a BadSetting


@dataclass
class Context:
    models: list
    launcher: kobold.Launcher | None
    gpu: kobold.GpuInfo
    backend: kobold.Backend
    settings: kobold_config.RunSettings

def check_numbers(args: KoboldOptions) -> None:
    """Numbers that would start a server only to fail (or wait forever): refused before anything starts."""
    if not args.timeout > 0:  # also NaN
        raise UserError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    if args.timeout == float("inf"):
        raise UserError("--timeout must be a finite number of seconds, not inf")
    for flag, value in (("--context-size", args.context_size), ("--max-tokens", args.max_tokens)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, not {value}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: not a TCP port")


def build_context(args: KoboldOptions, models: list | None = None) -> Context:
    """Models (the .nkat files found, unless `models` is given), launcher, GPU, backend, settings."""
    check_numbers(args)
    if args.register and not args.admindir:
        raise UserError("--register needs --admindir DIR (KoboldCpp's admin-mode config directory)")
    if models is None:
        models_dir = Path(args.models_dir) if args.models_dir else default_models_dir()
        if args.models_dir and not models_dir.is_dir():
            raise UserError(f"--models-dir {models_dir}: no such directory")
        models = kobold.find_models(models_dir, args.theta, args.model)
    wants_kobold = args.backend != "llama-cpp-python"
    launcher = kobold.find_launcher(args.koboldcpp) if wants_kobold or args.koboldcpp else None
    gpu = kobold.detect_gpu()
    backend = kobold.select_backend(args.backend, launcher if wants_kobold else None, gpu)
    settings = kobold_config.RunSettings(args.host, args.port, args.context_size, args.threads,
                                  args.gpu_layers, args.lora_mult)
    return Context(models, launcher, gpu, backend, settings)


def status(ctx: Context) -> dict:
    return {
        "models": [m.summary() for m in ctx.models],
        "koboldcpp": ctx.launcher.summary() if ctx.launcher else None,
        "gpu": {"vendor": ctx.gpu.vendor, "name": ctx.gpu.name, "source": ctx.gpu.source},
        "backend": ctx.backend.summary(),
    }


def check_can_register(ctx: Context) -> None:
    if ctx.launcher is None or ctx.backend.name == "llama-cpp-python":
        raise UserError("--register writes KoboldCpp configs: KoboldCpp not found "
                        f"(pass --koboldcpp PATH or set ${kobold.KOBOLDCPP_ENV}; it is on no package registry)")


def register(ctx: Context, args: KoboldOptions) -> list[Path]:
    check_can_register(ctx)
    paths = kobold_config.register_models(ctx.models, ctx.launcher, ctx.backend, ctx.settings, Path(args.admindir))
    for path in paths:
        say(f"registered {path}", args.quiet or args.json)
    if not ctx.launcher.has_admin:
        say(f"note: KoboldCpp {ctx.launcher.version or ''} has no admin mode; start one config with "
            "--config FILE.kcpps", args.quiet or args.json)
    return paths


def register_and_launch(ctx: Context, args: KoboldOptions, result: dict) -> dict:
    """--register's configs, then --launch's server, recorded in `result` (nkat kobold and --fit alike)."""
    if args.register:
        result["registered"] = [str(p) for p in register(ctx, args)]
    if args.launch:
        result["launch"] = launch(ctx, args)
    return result


def pick_model(ctx: Context, args: KoboldOptions):
    if not ctx.models:
        raise UserError("no NKAT model to launch: no .nkat in the models directory "
                        "(make one with nkat convert, or pass --theta FILE)")
    if len(ctx.models) > 1 and not (args.admindir and ctx.launcher and ctx.launcher.has_admin):
        names = ", ".join(m.name for m in ctx.models)
        raise UserError(f"{len(ctx.models)} NKAT models found ({names}): pick one with --theta FILE")
    return ctx.models[0]


def admin_password(args: KoboldOptions) -> str | None:
    password = os.environ.get(args.admin_password_env)
    if password is None and sys.stdin.isatty():
        password = getpass.getpass("KoboldCpp admin password (empty for none): ") or None
    if password is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"admin mode on {args.host} needs a password: set ${args.admin_password_env}")
    return password


def launch_config(ctx: Context, model, args: KoboldOptions, directory: Path) -> Path:
    """The start-up .kcpps in a private directory (it may hold the admin password)."""
    config = kobold_config.kcpps_config(model, ctx.launcher, ctx.backend, ctx.settings)
    if args.admindir and ctx.launcher.has_admin:
        config.update(admin=True, admindir=str(kobold_config.prepare_admindir(Path(args.admindir)).resolve()))
        password = admin_password(args)
        if password and ctx.launcher.accepts("adminpassword"):
            config["adminpassword"] = password
    path = directory / "launch.kcpps"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(kobold_config.render_kcpps(config))
    return path


def server_log(args: KoboldOptions, inputs) -> tuple[Path, bool]:
    """(log path, keep it afterwards): --log, or a new file in the system temp dir that outlives
    the run's private directory, so a failed start-up's message can point at it."""
    if args.log:
        log = Path(args.log)
        # The log is appended to, never replaced: a FIFO or /dev/stderr is fine, an input is not.
        if not (log.exists() and not log.is_dir() and not log.is_file()):
            check_output_path(log, inputs, flag="--log")
        return log, True
    fd, path = tempfile.mkstemp(prefix="nkat-server-", suffix=".log")
    os.close(fd)
    return Path(path), False


def start_server(ctx: Context, model, args: KoboldOptions, directory: Path, log: Path) -> kobold_server.RunningServer:
    if ctx.backend.name == "llama-cpp-python":
        gpu_layers = ctx.settings.gpu_layers if ctx.settings.gpu_layers is not None else 0
        return kobold_server.start_llama_server(model.base, model.theta, args.host, args.port, log,
                                                args.context_size, args.threads, gpu_layers)
    config = launch_config(ctx, model, args, directory)
    # KoboldCpp reads the config at start-up only: delete it (and any password) once it answers.
    return kobold_server.start_koboldcpp(ctx.launcher.command, config, args.host, args.port, log,
                                         cleanup=[config])


def generate_text(server, args: KoboldOptions) -> str:
    try:
        return kobold_server.generate(server, args.prompt, args.max_tokens, timeout=args.timeout)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"{server.kind} answered on {server.url} but the test generation failed: {exc}") from None


def launch(ctx: Context, args: KoboldOptions) -> dict:
    model = pick_model(ctx, args)
    quiet = args.quiet or args.json
    log, keep_log = server_log(args, [model.base, model.theta])
    try:
        with tempfile.TemporaryDirectory(prefix="nkat-kobold-") as tmp:
            result = _serve(ctx, model, args, Path(tmp), log, quiet)
    except UserError:
        keep_log = True  # the message names it
        raise
    finally:
        if not keep_log:
            log.unlink(missing_ok=True)
    return result


def _serve(ctx: Context, model, args: KoboldOptions, tmp: Path, log: Path, quiet: bool) -> dict:
    server = start_server(ctx, model, args, tmp, log)
    say(f"starting {server.kind} ({ctx.backend.name}) for {model.name} on {server.url} ...", quiet)
    try:
        ready_s = kobold_server.wait_ready(server, args.timeout)
        for path in server.cleanup:
            path.unlink(missing_ok=True)
        text = generate_text(server, args)
        result = {"server": server.kind, "backend": ctx.backend.name, "model": model.name,
                  "url": server.url, "ready_seconds": round(ready_s, 2),
                  "prompt": args.prompt, "generated": text, "stopped": args.smoke_only}
        say(f"{server.kind} listening on {server.url}; generated: {text!r}", quiet)
        if not args.smoke_only:
            say(f"serving until Ctrl-C (or SIGTERM); log: {log}", quiet)
            server.process.wait()
    except kobold_server.StartupError as exc:
        for line in exc.log_tail:
            print(f"  | {line}", file=sys.stderr)
        raise
    finally:
        server.stop()
    return result
