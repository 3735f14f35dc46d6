"""nkat kobold: serve NKAT models with KoboldCpp, or with llama-cpp-python's server when no
KoboldCpp is installed; register them for KoboldCpp's admin mode; smoke-test a launch."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..integrations.kobold import discovery as kobold
from ..integrations.kobold import config as kobold_config
from ..integrations.kobold import server as kobold_server
from ..errors import UserError
from ..util.output_paths import check_output_path
from ..util.report import human_bytes, print_json, print_table, say

DEFAULT_TIMEOUT_S = 180.0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "kobold",
        help="serve NKAT models with KoboldCpp (or llama-cpp-python's server) and register them",
        description="Find NKAT models (.nkat + base model) and KoboldCpp, choose a backend, write "
        ".kcpps configs for KoboldCpp's admin mode, and launch/smoke-test a server. Without "
        "KoboldCpp the embedded fallback is llama-cpp-python's OpenAI-compatible server. With no "
        "arguments on a terminal, an interactive menu offers the same choices.",
    )
    where = p.add_argument_group("what to serve")
    where.add_argument("--models-dir", metavar="DIR",
                       help=f"directory of .nkat files (default ${kobold.MODELS_DIR_ENV} or ./models)")
    where.add_argument("--theta", metavar="FILE", action="append",
                       help="a .nkat file (repeatable; replaces the models directory scan)")
    where.add_argument("--model", metavar="BASE", help="base model for the .nkat files (default: the path "
                       "recorded in each .nkat, then its directory, then --models-dir; checked by fingerprint); "
                       "a .nkat here serves that adapter")
    where.add_argument("--koboldcpp", metavar="PATH", help=f"koboldcpp.py, a koboldcpp binary or "
                       f"their directory (default ${kobold.KOBOLDCPP_ENV}, then PATH)")
    where.add_argument("--backend", choices=kobold.BACKENDS,
                       help="override the automatic choice (KoboldCpp library or llama-cpp-python)")
    what = p.add_argument_group("actions")
    what.add_argument("--register", action="store_true",
                      help="write one .kcpps per NKAT model into --admindir")
    what.add_argument("--admindir", metavar="DIR", help="KoboldCpp admin-mode config directory")
    what.add_argument("--launch", action="store_true",
                      help="start the server, wait until it answers, generate, print its address")
    what.add_argument("--smoke-only", action="store_true",
                      help="with --launch: stop the server again after the test generation")
    what.add_argument("--menu", action="store_true", help="interactive menu (default on a terminal)")
    srv = p.add_argument_group("server settings")
    srv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=kobold.DEFAULT_PORT, help="listen port (default 5001)")
    srv.add_argument("--context-size", type=int, default=kobold.DEFAULT_CONTEXT, help="context size")
    srv.add_argument("--threads", type=int, default=kobold_config.RunSettings.threads, help="CPU threads")
    srv.add_argument("--gpu-layers", type=int, default=None,
                     help="layers to offload (default: -1 = as many as fit on a GPU backend, 0 on CPU)")
    srv.add_argument("--lora-mult", type=float, default=1.0,
                     help="KoboldCpp --loramult (only releases that have it; 1 = stored gamma)")
    srv.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                     help="seconds to wait for the server to answer (default 180)")
    srv.add_argument("--log", metavar="FILE", help="server log file (default: a temporary file)")
    srv.add_argument("--prompt", default=kobold_server.SMOKE_PROMPT, help="test generation prompt")
    srv.add_argument("--max-tokens", type=int, default=16, help="test generation length")
    srv.add_argument("--admin-password-env", metavar="VAR", default=kobold.ADMIN_PASSWORD_ENV,
                     help="environment variable holding the KoboldCpp admin password "
                     "(prompted on a terminal when unset; never printed)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--quiet", action="store_true", help="no status lines")
    p.set_defaults(func=run)
    return p


@dataclass
class Context:
    models: list
    launcher: kobold.Launcher | None
    gpu: kobold.GpuInfo
    backend: kobold.Backend
    settings: kobold_config.RunSettings


def run(args) -> int:
    if args.smoke_only:
        args.launch = True
    interactive = args.menu or (not (args.register or args.launch or args.json)
                                and sys.stdin.isatty() and sys.stdout.isatty())
    if interactive:
        return menu(args)
    ctx = build_context(args)
    result = status(ctx)
    if args.register:
        result["registered"] = [str(p) for p in register(ctx, args)]
    if args.launch:
        result["launch"] = launch(ctx, args)
    if args.json:
        print_json(result)
    elif not args.launch or args.smoke_only:
        show(ctx, result, args.quiet)
    return 0


# ---------------------------------------------------------------- pieces

def build_context(args) -> Context:
    if args.register and not args.admindir:
        raise UserError("--register needs --admindir DIR (KoboldCpp's admin-mode config directory)")
    models_dir = Path(args.models_dir) if args.models_dir else kobold.default_models_dir()
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


def register(ctx: Context, args) -> list[Path]:
    if ctx.launcher is None or ctx.backend.name == "llama-cpp-python":
        raise UserError("--register writes KoboldCpp configs: KoboldCpp not found "
                        f"(pass --koboldcpp PATH or set ${kobold.KOBOLDCPP_ENV}; it is on no package registry)")
    paths = kobold_config.register_models(ctx.models, ctx.launcher, ctx.backend, ctx.settings, Path(args.admindir))
    for path in paths:
        say(f"registered {path}", args.quiet or args.json)
    if not ctx.launcher.has_admin:
        say(f"note: KoboldCpp {ctx.launcher.version or ''} has no admin mode; start one config with "
            "--config FILE.kcpps", args.quiet or args.json)
    return paths


def pick_model(ctx: Context, args):
    if not ctx.models:
        raise UserError("no NKAT model to launch: no .nkat in the models directory "
                        "(make one with nkat convert, or pass --theta FILE)")
    if len(ctx.models) > 1 and not (args.admindir and ctx.launcher and ctx.launcher.has_admin):
        names = ", ".join(m.name for m in ctx.models)
        raise UserError(f"{len(ctx.models)} NKAT models found ({names}): pick one with --theta FILE")
    return ctx.models[0]


def admin_password(args) -> str | None:
    password = os.environ.get(args.admin_password_env)
    if password is None and sys.stdin.isatty():
        password = getpass.getpass("KoboldCpp admin password (empty for none): ") or None
    if password is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"admin mode on {args.host} needs a password: set ${args.admin_password_env}")
    return password


def launch_config(ctx: Context, model, args, directory: Path) -> Path:
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


def server_log(args, inputs) -> tuple[Path, bool]:
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


def start_server(ctx: Context, model, args, directory: Path, log: Path) -> kobold_server.RunningServer:
    if ctx.backend.name == "llama-cpp-python":
        gpu_layers = ctx.settings.gpu_layers if ctx.settings.gpu_layers is not None else 0
        return kobold_server.start_llama_server(model.base, model.theta, args.host, args.port, log,
                                                args.context_size, args.threads, gpu_layers)
    config = launch_config(ctx, model, args, directory)
    # KoboldCpp reads the config at start-up only: delete it (and any password) once it answers.
    return kobold_server.start_koboldcpp(ctx.launcher.command, config, args.host, args.port, log,
                                         cleanup=[config])


def generate_text(server, args) -> str:
    try:
        return kobold_server.generate(server, args.prompt, args.max_tokens, timeout=args.timeout)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"{server.kind} answered on {server.url} but the test generation failed: {exc}") from None


def launch(ctx: Context, args) -> dict:
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


def _serve(ctx: Context, model, args, tmp: Path, log: Path, quiet: bool) -> dict:
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


# ---------------------------------------------------------------- output

def show(ctx: Context, result: dict, quiet: bool) -> None:
    if quiet:
        return
    rows = [(m.name, str(m.base.name), m.meta.get("theta_rank"), m.meta.get("theta_gamma"),
             human_bytes(int(m.meta.get("theta_bytes") or 0))) for m in ctx.models]
    print_table("NKAT models", ["name", "base model", "rank", "gamma", "theta"], rows,
                note=None if rows else "no .nkat files found (nkat convert makes them)")
    launcher = ctx.launcher
    setup = [
        ("KoboldCpp", str(launcher.path) if launcher else "not found"),
        ("version", launcher.version if launcher else None),
        ("libraries", ", ".join(launcher.libraries) if launcher else None),
        ("GPU", ctx.gpu.name or ctx.gpu.vendor or "none"),
        ("backend", f"{ctx.backend.name} ({ctx.backend.reason})"),
    ]
    for path in result.get("registered", []):
        setup.append(("registered", path))
    launch = result.get("launch")
    if launch:
        setup += [("listened on", launch["url"]), ("generated", repr(launch["generated"]))]
    print_table("Serving", ["item", "value"], setup)


# ---------------------------------------------------------------- interactive menu

MENU = [
    ("1", "show NKAT models, KoboldCpp and the backend"),
    ("2", "register NKAT models for KoboldCpp's admin mode (--register --admindir DIR)"),
    ("3", "smoke test: start, generate, stop (--launch --smoke-only)"),
    ("4", "serve one NKAT model until Ctrl-C (--launch)"),
    ("q", "quit"),
]


def menu(args) -> int:
    args.menu = False
    while True:
        print()
        for key, text in MENU:
            print(f"  {key}) {text}")
        try:
            choice = input("choice: ").strip().lower()
        except EOFError:
            return 0
        if choice in ("q", "quit", ""):
            return 0
        try:
            if choice == "1":
                ctx = build_context(args)
                show(ctx, status(ctx), False)
            elif choice == "2":
                args.admindir = args.admindir or input("admin directory: ").strip()
                ctx = build_context(args)
                show(ctx, {**status(ctx), "registered": [str(p) for p in register(ctx, args)]}, False)
            elif choice in ("3", "4"):
                args.launch, args.smoke_only = True, choice == "3"
                ctx = build_context(args)
                show(ctx, {**status(ctx), "launch": launch(ctx, args)}, False)
            else:
                print(f"no choice {choice!r}")
        except UserError as exc:
            print(f"nkat kobold: error: {exc}", file=sys.stderr)
