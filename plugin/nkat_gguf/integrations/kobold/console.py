"""`nkat kobold` as the user sees it: the status tables, the actions asked for on the command line,
and the interactive menu that offers the same choices."""

from __future__ import annotations

import sys
from dataclasses import replace

from ...errors import BadSetting, UserError
from ...util.report import human_bytes, print_json, print_table
from .workflow import Context, KoboldOptions, build_context, launch, register, register_and_launch, status


def run(args: KoboldOptions) -> int:
    if args.smoke_only:
        args = replace(args, launch=True)
    interactive = args.menu or (not (args.register or args.launch or args.json)
                                and sys.stdin.isatty() and sys.stdout.isatty())
    if interactive:
        return menu(args)
    ctx = build_context(args)
    result = status(ctx)
    register_and_launch(ctx, args, result)
    if args.json:
        print_json(result)
    elif not args.launch or args.smoke_only:
        show(ctx, result, args.quiet)
    return 0


# ---------------------------------------------------------------- output

def show(ctx: Context, result: dict, quiet: bool) -> None:
    if quiet:
        return
    rows = [(m.name, str(m.base.name), m.meta.theta_rank, m.meta.theta_gamma, human_bytes(m.meta.theta_bytes))
            for m in ctx.models]
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


def menu(args: KoboldOptions) -> int:
    args = replace(args, menu=False)
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
                args = replace(args, admindir=args.admindir or input("admin directory: ").strip())
                ctx = build_context(args)
                show(ctx, {**status(ctx), "registered": [str(p) for p in register(ctx, args)]}, False)
            elif choice in ("3", "4"):
                args = replace(args, launch=True, smoke_only=choice == "3")
                ctx = build_context(args)
                show(ctx, {**status(ctx), "launch": launch(ctx, args)}, False)
            else:
                print(f"no choice {choice!r}")
        except UserError as exc:
            if isinstance(exc, BadSetting):  # named by the flag that set it (cli.dispatch)
                exc = exc.worded(args.setting_flags)
            print(f"nkat kobold: error: {exc}", file=sys.stderr)
