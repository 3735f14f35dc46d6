"""Arguments and helpers shared by several commands (one definition each)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from ..errors import Setting, UserError
from ..formats.defaults import default_model_path, default_models_dir
from ..runtime.settings import BACKENDS, RuntimeSettings


# The flag that sets each setting a layer below may refuse (errors.BadSetting), as most commands
# name it; a command's own `setting_flags` win (nkat optimize sets the theta rank with --target-rank).
SETTING_FLAGS = {
    Setting.THETA_RANK: "--theta-rank", Setting.THETA_TYPE: "--theta-type", Setting.THETA_GAMMA: "--theta-gamma",
    Setting.LAYERS: "--selective-layers", Setting.SOURCE: "--source", Setting.STRUCTURE: "--structure",
    Setting.REFERENCE: "--reference", Setting.IMATRIX: "--imatrix", Setting.COVARIANCE: "--covariance",
    Setting.BUDGET_MB: "--budget-mb", Setting.BUDGET_PCT: "--budget-pct", Setting.MAX_MATRICES: "--max-matrices",
    Setting.MODEL: "--model", Setting.THETA: "--theta", Setting.MODELS_DIR: "--models-dir",
    Setting.EVAL_TEXT: "--text", Setting.CTX: "--ctx", Setting.CHUNKS: "--chunks", Setting.GAMMA: "--gamma",
    Setting.BACKEND: "--backend", Setting.QUANT_TYPE: "--type", Setting.TENSOR_TYPE: "--tensor-type",
    Setting.OUTPUT: "--output", Setting.OUTPUT_DIR: "--output-dir", Setting.GPTQ_DAMP: "--damp",
    Setting.QUANT_METHOD: "--method",
}

EVAL_TEXT_HELP = "evaluation text (default: $NKAT_EVAL_TEXT or WikiText-2 test beside a checkout)"
BACKEND_HELP = "lora: llama.cpp's adapter path (default); shim: the native eval-callback hook"


def add_output_flags(parser: argparse.ArgumentParser, quiet_help: str = "no progress bars or status lines") -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help=quiet_help)


def add_model_flag(parser, help: str, *aliases: str, **kwargs) -> None:
    """--model (after older names for the same flag): `help` says what this command loads."""
    parser.add_argument(*aliases, "--model", help=help, **kwargs)


def add_text_flag(parser, help: str = EVAL_TEXT_HELP) -> None:
    parser.add_argument("--text", help=help)


def add_backend_flag(parser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="lora", help=BACKEND_HELP)


def add_threads_flag(parser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads (default: all cores, at most 8)")


def add_runtime_flags(parser: argparse.ArgumentParser, ctx_default: int | None = 512, flash_attn: bool = True,
                      backend: bool = False) -> None:
    """The RuntimeSettings flags (see runtime_settings): --ctx unless ctx_default is None, --threads,
    --flash-attn unless flash_attn is False, --backend when backend is True."""
    if ctx_default is not None:
        parser.add_argument("--ctx", type=positive_int, default=ctx_default, metavar="N",
                            help=f"context length per chunk (default {ctx_default}, as llama-perplexity)")
    add_threads_flag(parser)
    if flash_attn:
        parser.add_argument("--flash-attn", action="store_true",
                            help="use flash attention (off by default, as llama-cpp-python; "
                                 "llama-perplexity's 'auto' turns it on and shifts PPL by 0.1-0.4%%)")
    if backend:
        add_backend_flag(parser)


def runtime_settings(args: argparse.Namespace, **overrides) -> RuntimeSettings:
    """The command's llama.cpp settings, once, from its flags; a flag the command lacks keeps
    RuntimeSettings' default, and `overrides` (e.g. gpu_layers) win."""
    given = {f.name: getattr(args, f.name) for f in fields(RuntimeSettings) if hasattr(args, f.name)}
    return RuntimeSettings(**(given | overrides))


def model_path(value) -> str:
    """--model, or the embedded SmolLM2-135M-Instruct Q4_1."""
    return str(value) if value else str(default_model_path())


def add_models_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", metavar="DIR",
                        help="where to look for a .nkat's base model when it is not at the recorded path "
                             "or beside the .nkat (default $NKAT_MODELS_DIR or ./models)")


def model_and_thetas(values, thetas=(), models_dir=None) -> tuple[str, list[str], list[str]]:
    """--model values (GGUF models or .nkat adapters) -> (first model, thetas for it, other models).

    A .nkat stands for its base model plus itself as theta (nkat_format.find_base_model finds the
    base); every .nkat must correct the same base as the first model.
    """
    from ..formats.nkat_format import split_model_argument

    models_dir = models_dir or default_models_dir()
    values = [v for v in (values or []) if v] or [None]
    first, out_thetas, others = None, [], []
    for value in values:
        base, found = split_model_argument(value, [], models_dir) if value else (model_path(None), [])
        if first is None:
            first = base
        elif found and Path(base).resolve() != Path(first).resolve():
            raise UserError(f"{value} corrects {base}, not the first --model {first}")
        elif not found:
            others.append(base)
        out_thetas += found
    return first, out_thetas + [str(t) for t in thetas], others


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def count(text: str) -> int:
    """A whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


_SIZE_UNITS = {"": 2**20, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def byte_size(text: str) -> int:
    """A memory size: 8G, 3000M, 512MiB, or a plain number of MiB."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a size such as 8G or 3000M, not {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def csv(text: str) -> list[str]:
    """A comma-separated flag value as a list (empty items dropped)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def reference_path(value) -> str:
    """--reference, or the qwen model of the [qwen] extra when it is not given."""
    if value:
        return str(value)
    from ..formats.defaults import qwen_model_path

    return str(qwen_model_path())


def show_outputs(args, result: dict, stem: str, markdown, plot) -> int:
    """Write JSON, markdown and PNG into --work-dir; print the JSON or the markdown table."""
    from ..measure.frontier_report import write_outputs
    from ..util.report import print_json, say

    paths = write_outputs(result, Path(args.work_dir), stem, markdown, plot)
    if args.json:
        print_json(result)
        return 0
    print(markdown(result))
    say(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}", args.quiet)
    return 0
