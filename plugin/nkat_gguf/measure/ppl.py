"""Perplexity runs as users ask for them: base, base + theta, other models, against a reference.

Builds the runtimes, runs evaluate.evaluate() once over shared chunks, and turns the results
into rows with bytes, TPE and gap recovered. Used by `nkat ppl`, `nkat quickstart` and the
optimizer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .byte_control import best_control, charged_tpe
from .evaluate import check_chunks, check_ctx, evaluate
from .rows import score_row
from ..util.report import say
from ..runtime.engine import Runtime
from ..runtime.settings import RuntimeSettings


@dataclass
class PplRequest:
    models: list[str]
    text: str
    thetas: list[str] = field(default_factory=list)  # each applied to models[0]
    gamma: float | None = None
    reference: str | None = None
    chunks: int | None = None
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)  # ctx: tokens per chunk
    quiet: bool = False


def read_text(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"text file is empty: {path}")
    return data


def _runtime(model, theta, req: PplRequest) -> Runtime:
    return Runtime.from_settings(model, theta, req.runtime, gamma=req.gamma if theta else None)


def theta_label(path: str) -> str:
    return f"+ {Path(path).name}"


def run_ppl(req: PplRequest) -> dict:
    """Base model, base + each theta, other models and the reference, on the same chunks."""
    started = time.perf_counter()
    if not req.models:
        raise UserError("no --model given")
    check_ctx(req.runtime.ctx)
    check_chunks(req.chunks)
    for path in req.models + ([req.reference] if req.reference else []) + req.thetas:
        if not Path(path).is_file():
            raise UserError(f"file not found: {path}")
    text = read_text(req.text)
    runtimes, candidates, info = [], {}, {}
    try:
        base_label = Path(req.models[0]).name
        for theta in req.thetas:  # theta files first: they check the base fingerprint
            rt = _runtime(req.models[0], theta, req)
            runtimes.append(rt)
            label = theta_label(theta)
            candidates[label] = rt
            info[label] = {"theta_bytes": rt.theta_meta.theta_bytes, "gamma": rt.gamma,
                           "model": req.models[0]}
        base = {base_label: _runtime(req.models[0], None, req)}
        runtimes.append(base[base_label])
        info[base_label] = {"theta_bytes": 0, "model": req.models[0]}
        for other in req.models[1:]:
            rt = _runtime(other, None, req)
            runtimes.append(rt)
            base[Path(other).name] = rt
            info[Path(other).name] = {"theta_bytes": 0, "model": other}
        candidates = base | candidates
        reference = None
        if req.reference:
            reference = _runtime(req.reference, None, req)
            runtimes.append(reference)
        tokens = base[base_label].tokenize(text)
        results = evaluate(candidates, tokens, req.runtime.ctx, req.chunks, reference=reference, quiet=req.quiet)
        report_never_applied(candidates, info)
        settings = runtimes[0].settings() | {"text": str(req.text), "chunks": results[base_label]["chunks"],
                                             "text_tokens": int(len(tokens))}
    finally:
        for rt in runtimes:
            rt.close()
    return assemble(results, info, base_label, req.reference, settings, started)


def report_never_applied(candidates: dict, info: dict) -> None:
    """Say which theta tensors the run never applied (shim backend), and record them."""
    for label, rt in candidates.items():
        missing = rt.never_applied() if rt.theta_path else []
        if missing:
            info[label]["theta_never_applied"] = missing
            say(f"warning: {label}: {len(missing)} theta tensor(s) were never applied during the run "
                f"(first: {missing[0]}); its figures are those of a partial theta")


def assemble(results: dict, info: dict, base_label: str, reference_path, settings: dict, started: float) -> dict:
    """Rows with bytes, TPE, KLD and gap recovered; the first theta row is the headline."""
    rows = []
    ref_ppl = results["reference"]["ppl"] if "reference" in results else None
    base_ppl = results[base_label]["ppl"]
    base_bytes = Path(info[base_label]["model"]).stat().st_size
    for label, res in results.items():
        if label.startswith("_") or label == "reference":
            continue
        is_theta = "gamma" in info[label]
        row = {"label": label} | score_row(res, base_bytes, info[label]["theta_bytes"],
                                           Path(info[label]["model"]).stat().st_size,
                                           base_ppl if is_theta and ref_ppl is not None else None, ref_ppl)
        if "theta_never_applied" in info[label]:
            row["theta_never_applied"] = info[label]["theta_never_applied"]
        if is_theta:
            row["gamma"] = info[label]["gamma"]
        if ref_ppl is not None:
            row["ppl_ratio"] = res["ppl"] / ref_ppl
        rows.append(row)
    if ref_ppl is not None:
        ref_bytes = Path(reference_path).stat().st_size
        rows.append({"label": f"{Path(reference_path).name} (reference)"}
                    | score_row(results["reference"], base_bytes, 0, ref_bytes) | {"ppl_ratio": 1.0})

    main = next((r for r in rows if "gamma" in r), rows[0])
    summary = {k: main.get(k) for k in ("ppl", "ppl_err", "tokens", "tpe", "rho", "kld_mean", "kld_p99",
                                         "top1_agreement", "gap_recovered")}
    summary["label"] = main["label"]
    if ref_ppl is not None:
        summary["ppl_reference"] = ref_ppl
        summary["ppl_ratio"] = main["ppl"] / ref_ppl
    summary["ppl_base"] = base_ppl
    summary["tpe_base"] = charged_tpe(base_ppl, base_bytes, base_bytes)
    plain = [r for r in rows if "gamma" not in r]
    controls = {r["label"]: best_control(r, plain) for r in rows if "gamma" in r}
    return summary | {"rows": rows, "controls": controls, "settings": settings, "wall_seconds": time.perf_counter() - started}


CHECK_CHUNKS = 2  # the quick check of a new theta against its base
CHEAP_CHECK_BYTES = 2 << 30  # models up to this size are checked by default (seconds on 2 cores)


def check_theta(model: str, theta: str, text: str, chunks: int = CHECK_CHUNKS,
                runtime: RuntimeSettings = RuntimeSettings()) -> dict:
    """Score base and base + theta on the first `chunks` chunks: does theta make the model worse?"""
    res = run_ppl(PplRequest(models=[model], text=text, thetas=[theta], chunks=chunks, runtime=runtime, quiet=True))
    return {"chunks": res["settings"]["chunks"], "ctx": runtime.ctx, "text": text, "ppl_base": res["ppl_base"], "ppl": res["ppl"],
            "tpe_base": res["tpe_base"], "tpe": res["tpe"], "harmful": bool(res["ppl"] > res["ppl_base"])}


def check_words(check: dict) -> str:
    """One phrase for a check's figures, e.g. 'PPL 29.65 -> 28.90 on 2 chunks of wiki.test.raw'."""
    if "skipped" in check:
        return f"not measured ({check['skipped']})"
    return (f"PPL {check['ppl_base']:.2f} -> {check['ppl']:.2f} on {check['chunks']} chunks of "
            f"{Path(check['text']).name}")
