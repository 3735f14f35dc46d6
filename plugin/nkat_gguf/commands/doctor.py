"""nkat doctor: environment checks for the NKAT path, PASS/WARN/FAIL with a fix per problem."""

from __future__ import annotations

from rich.markup import escape

from ..jobs import doctor
from ..util.report import print_json, print_table
from .common import add_output_flags

_STYLE = {doctor.PASS: "green", doctor.WARN: "yellow", doctor.FAIL: "bold red"}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "doctor",
        help="check Python, llama-cpp-python, the native shim, GPU, KoboldCpp, disk and the default model",
        description="Environment checks printed as PASS/WARN/FAIL with a one-line fix for each "
        "problem. Exit status 0 when the NKAT path is usable (no FAIL), 1 otherwise. GPU, nvcc and "
        "KoboldCpp are optional: their absence is a WARN.",
    )
    p.add_argument("--koboldcpp", metavar="PATH", help="koboldcpp.py, a koboldcpp binary or their directory "
                   "(default $KOBOLDCPP, then PATH)")
    p.add_argument("--models-dir", metavar="DIR", help="where NKAT models go (default $NKAT_MODELS_DIR or ./models)")
    add_output_flags(p, quiet_help="print only WARN and FAIL rows")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    checks = doctor.run_checks(args.koboldcpp, args.models_dir)
    code = doctor.exit_code(checks)
    if args.json:
        print_json({"ok": code == 0, "exit_code": code, "checks": [c.as_dict() for c in checks]})
        return code
    shown = [c for c in checks if not (args.quiet and c.status == doctor.PASS)]
    rows = [(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix or "")) for c in shown]
    verdict = "NKAT path usable" if code == 0 else "NKAT path NOT usable: fix the FAIL rows"
    if rows or not args.quiet:
        print_table("nkat doctor", ["check", "status", "detail", "fix"], rows, note=verdict)
    return code
