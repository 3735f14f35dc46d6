"""nkat kobold: serve NKAT models with KoboldCpp, or with llama-cpp-python's server when no
KoboldCpp is installed; register them for KoboldCpp's admin mode; smoke-test a launch."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..errors import Setting, UserError
from ..formats.defaults import MODELS_DIR_ENV
from ..integrations.kobold import config as kobold_config
from ..integrations.kobold import console
from ..integrations.kobold import discovery as kobold
from ..integrations.kobold import server as kobold_server
from ..integrations.kobold.workflow import DEFAULT_TIMEOUT_S, SMOKE_MAX_TOKENS, KoboldOptions
from ..jobs import kobold_fit
from ..jobs.kobold_fit import FitOptions
from ..recipe.costs import DEFAULT_ROWS
from .common import add_model_flag, add_output_flags, byte_size, count, csv, positive_int


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
                       help=f"directory of .nkat files (default ${MODELS_DIR_ENV} or ./models)")
    where.add_argument("--theta", metavar="FILE", action="append",
                       help="a .nkat file (repeatable; replaces the models directory scan)")
    add_model_flag(where, "base model for the .nkat files (default: the path recorded in each .nkat, then its "
                   "directory, then --models-dir; checked by fingerprint); a .nkat here serves that adapter",
                   metavar="BASE")
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
    srv.add_argument("--max-tokens", type=int, default=SMOKE_MAX_TOKENS, help="test generation length")
    srv.add_argument("--admin-password-env", metavar="VAR", default=kobold.ADMIN_PASSWORD_ENV,
                     help="environment variable holding the KoboldCpp admin password "
                     "(prompted on a terminal when unset; never printed)")
    fit = p.add_argument_group(
        "fit the model to this machine",
        "--fit: the budget is the free memory (VRAM on a GPU backend when nvidia-smi answers, else RAM) minus "
        "the KV cache at --context-size, llama.cpp's buffers and 10% headroom. A reference that fits is served "
        "as it is; else nkat mix writes its best file for the budget (cached: the same inputs reuse the file, and the last "
        "fitted file is kept while it fits and the budget grew by less than 5%). "
        "--register writes a .kcpps for it (no LoRA), --launch serves it.")
    fit.add_argument("--fit", action="store_true", help="choose, make or reuse the model file for this machine")
    fit.add_argument("--reference", metavar="GGUF",
                     help="the model to fit (default: --model, then the embedded SmolLM2-135M-Instruct)")
    fit.add_argument("--fit-memory", type=byte_size, metavar="SIZE",
                     help="free memory to plan for, e.g. 2G or 1500M (default: measured)")
    fit.add_argument("--fit-output", metavar="OUT.gguf",
                     help="the mix to write (default: <models dir>/<reference>-fit.gguf; caches in OUT-work/)")
    fit.add_argument("--imatrix", metavar="FILE", help="the reference's imatrix (default: the mix calibrates one)")
    fit.add_argument("--fit-chunks", type=count, default=FitOptions.chunks, metavar="N",
                     help=f"the mix's --fit-chunks (default {FitOptions.chunks}; 0: no probe files)")
    fit.add_argument("--fit-rows", type=positive_int, default=DEFAULT_ROWS, metavar="N",
                     help=f"the mix's --rows: rows sampled per tensor (default {DEFAULT_ROWS})")
    fit.add_argument("--fit-types", type=csv, metavar="T,T,...",
                     help="the mix's --types (default: fast on a CPU backend, where the i-quants decode slowly; "
                     "all on a GPU)")
    add_output_flags(p, quiet_help="no status lines")
    p.set_defaults(func=run, setting_flags={Setting.OUTPUT: "--fit-output"})
    return p


FIT_FLAGS = {"reference": "--reference", "fit_memory": "--fit-memory", "fit_output": "--fit-output",
             "imatrix": "--imatrix", "fit_types": "--fit-types"}


def run(args) -> int:
    options = KoboldOptions(**{f.name: getattr(args, f.name) for f in fields(KoboldOptions)})
    if not args.fit:
        given = [flag for dest, flag in FIT_FLAGS.items() if getattr(args, dest) is not None]
        if given:
            raise UserError(f"{given[0]} needs --fit")
        return console.run(options)
    if args.menu or args.theta:
        raise UserError(f"--fit serves one plain GGUF: drop {'--menu' if args.menu else '--theta'}")
    fit = FitOptions(reference=args.reference, memory=args.fit_memory, output=args.fit_output, imatrix=args.imatrix,
                     chunks=args.fit_chunks, rows=args.fit_rows, types=args.fit_types)
    return kobold_fit.run(options, fit)
