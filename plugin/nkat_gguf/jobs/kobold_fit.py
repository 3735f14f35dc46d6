"""`nkat kobold --fit`: the best file this machine can hold, registered and served like any model.

free memory of the device the model runs on (integrations.kobold.fit) -> the budget left after the
KV cache at --context-size, llama.cpp's buffers and a headroom -> the reference as it is when it fits,
else `nkat mix`'s file for that budget (recipe.mix: cached in its work dir by content, so a rerun with
the same inputs reuses the file; the last fit is also kept while it fits and the budget grew by less
than REUSE_SLACK, as measured free memory moves from run to run) -> a .kcpps with no LoRA (--register) and a server (--launch),
through the same workflow as NKAT models.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadSetting, Setting, UserError
from ..formats.defaults import default_model_path, default_models_dir
from ..formats.gguf_io import open_gguf_magic
from ..formats.nkat_format import is_nkat_path
from ..integrations.kobold import fit as fitting
from ..integrations.kobold import server as kobold_server
from ..integrations.kobold.discovery import PlainModel
from ..integrations.kobold.workflow import Context, KoboldOptions, build_context, check_can_register, \
    register_and_launch, status
from ..recipe.candidates import CANDIDATE_TYPES, FAST_TYPES, check_types
from ..recipe.costs import DEFAULT_ROWS
from ..recipe.fit import DEFAULT_CHUNKS as DEFAULT_FIT_CHUNKS
from ..recipe.mix import MixOptions, run_mix
from ..recipe.report import mix_markdown
from ..runtime.settings import RuntimeSettings
from ..util.atomic import write_text_atomic
from ..util.output_paths import check_output_path
from ..util.report import human_bytes, print_json, print_table, say, to_json

MiB = fitting.MiB
GPU_BACKENDS = ("cuda", "vulkan", "clblast")
# Measured free memory moves from run to run, and a new mix of a large model takes minutes: the last
# fitted file is kept while it fits and the budget exceeds the one it was made for by at most this share.
REUSE_SLACK = 0.05
FIT_RECORD = "fit.json"  # in the mix's work dir: the inputs, budget and file of the last fit


@dataclass
class FitOptions:
    """What --fit was asked besides the serving options."""

    reference: str | None = None   # None: --model, then the embedded model
    memory: int | None = None      # bytes of free memory (--fit-memory); None: measured
    output: str | None = None      # None: <models dir>/<reference stem>-fit.gguf
    imatrix: str | None = None     # None: the mix calibrates one in its work dir
    chunks: int = DEFAULT_FIT_CHUNKS  # the mix's --fit-chunks (probe scoring for the role x depth weights)
    rows: int = DEFAULT_ROWS       # the mix's sampled rows per tensor
    types: list[str] | None = None  # the mix's candidate types; None: all


def on_gpu(ctx: Context) -> bool:
    """The model will sit in VRAM: a KoboldCpp GPU backend, or the fallback server with --gpu-layers."""
    if ctx.backend.name in GPU_BACKENDS:
        return ctx.settings.gpu_layers != 0
    return bool(ctx.settings.gpu_layers)


def reference_of(fit: FitOptions, args: KoboldOptions) -> Path:
    value = fit.reference or args.model
    flag = "--reference" if fit.reference else "--model"
    if not value:
        return default_model_path().resolve()
    path = Path(value)
    if is_nkat_path(path):
        raise UserError(f"{flag} {path}: a .nkat adapter; --fit quantizes a GGUF model (give its base)")
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    open_gguf_magic(path)
    return path.resolve()


def output_of(fit: FitOptions, args: KoboldOptions, reference: Path) -> Path:
    if fit.output:
        out = Path(fit.output)
    else:
        models_dir = Path(args.models_dir) if args.models_dir else default_models_dir()
        if args.models_dir and not models_dir.is_dir():
            raise UserError(f"--models-dir {models_dir}: no such directory")
        models_dir.mkdir(parents=True, exist_ok=True)
        out = models_dir / f"{reference.stem}-fit.gguf"
    check_output_path(out, [reference], Setting.OUTPUT)
    return out


def fit_inputs(reference: Path, fit: FitOptions, types: list[str]) -> dict:
    """What the mix is made from, as recorded beside it (a changed reference file changes its mtime)."""
    st = reference.stat()
    return {"reference": str(reference), "reference_bytes": st.st_size, "reference_mtime_ns": st.st_mtime_ns,
            "imatrix": str(Path(fit.imatrix).resolve()) if fit.imatrix else None, "rows": fit.rows, "types": types,
            "fit_chunks": fit.chunks}


def earlier_fit(work: Path, out: Path, inputs: dict, budget: int) -> dict | None:
    """The record of the last mix written to `out`, when it came from the same inputs, `out` is still
    that file, it fits `budget`, and `budget` exceeds the one it was made for by REUSE_SLACK at most."""
    try:
        record = json.loads((work / FIT_RECORD).read_text(encoding="utf-8"))
        st = out.stat()
        same = (record["inputs"] == inputs and st.st_size == record["file_bytes"]
                and st.st_mtime_ns == record["file_mtime_ns"])
        fits = record["file_bytes"] <= budget <= record["budget_bytes"] * (1 + REUSE_SLACK)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if same and fits else None


def choose(ctx: Context, args: KoboldOptions, fit: FitOptions) -> dict:
    """The plan and the file it leads to: the reference when it fits, else the mix for the budget."""
    quiet = args.quiet or args.json
    reference = reference_of(fit, args)
    # on CPU the i-quants decode slowly: the 1.5B's 821 MiB mix generated 0.61x Q3_K_S's tokens/s with
    # them and 1.11x without (docs/RESULTS.md), so a CPU backend's default leaves them out
    types = check_types(fit.types) if fit.types else list(CANDIDATE_TYPES if on_gpu(ctx) else FAST_TYPES)
    if fit.imatrix and not Path(fit.imatrix).is_file():
        raise UserError(f"--imatrix {fit.imatrix}: no such file")
    if fit.output:  # refused before anything runs, whether or not a mix turns out to be needed
        output_of(fit, args, reference)
    memory = fitting.free_memory(on_gpu(ctx), fit.memory)
    plan = fitting.plan_fit(reference, args.context_size, memory.bytes, memory.device)
    ref_bytes = reference.stat().st_size
    result = {"reference": str(reference), "reference_bytes": ref_bytes, "memory_source": memory.source,
              "context_size": args.context_size, "plan": plan.to_dict()}
    if ref_bytes <= plan.budget_bytes:
        return result | {"file": str(reference), "file_bytes": ref_bytes, "mixed": False, "reused": None,
                         "type_counts": None, "mix_report": None,
                         "why": f"the reference ({human_bytes(ref_bytes)}) fits the budget: served as it is"}
    mib = plan.budget_bytes // MiB
    out = output_of(fit, args, reference)
    work = out.parent / f"{out.stem}-work"
    inputs = fit_inputs(reference, fit, types)
    earlier = earlier_fit(work, out, inputs, plan.budget_bytes)
    if earlier:
        made_for = earlier["budget_bytes"] / MiB
        return result | {
            "file": str(out), "file_bytes": earlier["file_bytes"], "mixed": True, "reused": True,
            "budget": earlier["budget"], "type_counts": earlier["type_counts"], "mix_report": str(work / "mix.md"),
            "why": f"the reference ({human_bytes(ref_bytes)}) is larger than the budget: nkat mix's file made earlier "
                   f"for {made_for:,.0f} MiB, which still fits and is within {REUSE_SLACK:.0%} of this budget"}
    say(f"[fit] {plan.reason()}; the reference ({human_bytes(ref_bytes)}) does not fit: nkat mix for {mib} MiB", quiet)
    opts = MixOptions(reference=str(reference), output=str(out), work_dir=str(work), budgets=[f"{mib}MiB"],
                      imatrix=fit.imatrix, rows=fit.rows, types=types, fit_chunks=fit.chunks,
                      runtime=RuntimeSettings(threads=args.threads), quiet=quiet)
    started = time.time()
    fresh = not work.exists()
    try:
        mixed = run_mix(opts)
    except BaseException as exc:
        if fresh:  # nothing of a failed first run is left behind
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, UserError) and not isinstance(exc, BadSetting):
            raise UserError(f"{plan.reason()}: {exc}") from None
        raise
    write_text_atomic(work / "mix.json", to_json(mixed))
    write_text_atomic(work / "mix.md", mix_markdown(mixed))
    mix = mixed["mixes"][0]
    reused = Path(mix["model"]).stat().st_mtime < started
    write_text_atomic(work / FIT_RECORD, to_json({
        "inputs": inputs, "budget": mix["budget"], "budget_bytes": mix["budget_bytes"], "file_bytes": mix["file_bytes"],
        "file_mtime_ns": out.stat().st_mtime_ns, "type_counts": mix["type_counts"]}))
    return result | {
        "file": str(out), "file_bytes": mix["file_bytes"], "mixed": True, "reused": reused,
        "budget": mix["budget"], "type_counts": mix["type_counts"], "mix_report": str(work / "mix.md"),
        "why": f"the reference ({human_bytes(ref_bytes)}) is larger than the budget: nkat mix's file for {mib} MiB"
               + (" (reused from an earlier run)" if reused else ""),
    }


def run(args: KoboldOptions, fit: FitOptions) -> int:
    ctx = build_context(args, models=[])
    if args.register:
        check_can_register(ctx)
    if args.launch:
        kobold_server.check_port(args.host, args.port)
    chosen = choose(ctx, args, fit)
    model = PlainModel(Path(chosen["file"]))
    ctx.models = [model]
    result = status(ctx) | {"fit": chosen}
    if not (args.json or args.quiet):
        show(ctx, result)
    register_and_launch(ctx, args, result)
    if args.json:
        print_json(result)
    return 0


def show(ctx: Context, result: dict) -> None:
    fit = result["fit"]
    counts = fit["type_counts"]
    rows = [
        ("memory", f"{fit['plan']['device']}, from {fit['memory_source']}"),
        ("budget", fit["plan"]["reason"]),
        ("reference", f"{fit['reference']} ({human_bytes(fit['reference_bytes'])})"),
        ("chosen", f"{fit['file']} ({human_bytes(fit['file_bytes'])})"),
        ("why", fit["why"]),
    ]
    if counts:
        rows.append(("types", ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))))
        rows.append(("mix report", fit["mix_report"]))
    rows.append(("backend", f"{ctx.backend.name} ({ctx.backend.reason})"))
    print_table(f"Fit at context {fit['context_size']}", ["item", "value"], rows)
