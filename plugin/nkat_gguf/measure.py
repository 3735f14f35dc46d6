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

from .errors import UserError
from .evaluate import evaluate, gap_recovered, tpe
from .nkat_format import read_meta
from .runtime import Runtime


@dataclass
class PplRequest:
    models: list[str]
    text: str
    theta: str | None = None
    gamma: float | None = None
    backend: str = "lora"
    reference: str | None = None
    ctx: int = 512
    chunks: int | None = None
    threads: int | None = None
    flash_attn: bool = False
    quiet: bool = False
    extra_gammas: list[float] = field(default_factory=list)


def read_text(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"text file is empty: {path}")
    return data


def _runtime(model, theta, req: PplRequest, gamma=None) -> Runtime:
    return Runtime(model, theta, backend=req.backend, gamma=gamma, n_ctx=req.ctx,
                   n_threads=req.threads, flash_attn=req.flash_attn)


def run_ppl(req: PplRequest) -> dict:
    started = time.perf_counter()
    if not req.models:
        raise UserError("no --model given")
    for path in req.models + ([req.reference] if req.reference else []) + ([req.theta] if req.theta else []):
        if not Path(path).is_file():
            raise UserError(f"file not found: {path}")
    text = read_text(req.text)
    runtimes = []
    try:
        primary = _runtime(req.models[0], req.theta, req, req.gamma)
        runtimes.append(primary)
        candidates, info = {}, {}
        base_label = Path(req.models[0]).name
        if req.theta:
            # Base = the same loaded model with theta at gamma 0 (bit-identical to no theta).
            candidates[base_label] = (primary, 0.0)
            theta_bytes = int(read_meta(req.theta)["theta_bytes"])
            gammas = [primary.gamma] + [g for g in req.extra_gammas if g != primary.gamma]
            for g in gammas:
                label = f"{base_label} + theta (gamma {g:g})"
                candidates[label] = (primary, g)
                info[label] = {"theta_bytes": theta_bytes, "gamma": g, "theta": True}
        else:
            candidates[base_label] = primary
        info.setdefault(base_label, {"theta_bytes": 0, "theta": False})
        for other in req.models[1:]:
            rt = _runtime(other, None, req)
            runtimes.append(rt)
            candidates[Path(other).name] = rt
            info[Path(other).name] = {"theta_bytes": 0, "theta": False}
        reference = None
        if req.reference:
            reference = _runtime(req.reference, None, req)
            runtimes.append(reference)
        tokens = primary.tokenize(text)
        results = evaluate(candidates, tokens, req.ctx, req.chunks, reference=reference, quiet=req.quiet)
        settings = primary.settings() | {"text": str(req.text), "chunks": results[base_label]["chunks"],
                                         "text_tokens": int(len(tokens))}
    finally:
        for rt in runtimes:
            rt.close()

    model_bytes = {label: Path(rt.model_path if not isinstance(rt, tuple) else rt[0].model_path).stat().st_size
                   for label, rt in candidates.items()}
    rows = []
    ref_ppl = results["reference"]["ppl"] if reference is not None else None
    base_ppl = results[base_label]["ppl"]
    for label, res in results.items():
        if label.startswith("_") or label == "reference":
            continue
        theta_bytes = info[label]["theta_bytes"]
        row = {"label": label, "model_bytes": model_bytes[label], "theta_bytes": theta_bytes,
               "bytes": model_bytes[label] + theta_bytes, "rho": theta_bytes / model_bytes[label],
               "tpe": tpe(res["ppl"], theta_bytes, model_bytes[label])} | res
        if info[label].get("theta"):
            row["gamma"] = info[label]["gamma"]
            if ref_ppl is not None:
                row["gap_recovered"] = gap_recovered(base_ppl, res["ppl"], ref_ppl)
        if ref_ppl is not None:
            row["ppl_ratio"] = res["ppl"] / ref_ppl
        rows.append(row)
    if reference is not None:
        ref_bytes = Path(req.reference).stat().st_size
        rows.append({"label": f"{Path(req.reference).name} (reference)", "model_bytes": ref_bytes,
                     "theta_bytes": 0, "bytes": ref_bytes, "rho": 0.0,
                     "tpe": tpe(ref_ppl), "ppl_ratio": 1.0} | results["reference"])

    main = next((r for r in rows if "gamma" in r), rows[0])
    summary = {k: main.get(k) for k in ("ppl", "ppl_err", "tokens", "tpe", "rho", "kld_mean", "kld_p99",
                                         "top1_agreement", "gap_recovered")}
    summary["label"] = main["label"]
    if ref_ppl is not None:
        summary["ppl_reference"] = ref_ppl
        summary["ppl_ratio"] = main["ppl"] / ref_ppl
    summary["ppl_base"] = base_ppl
    summary["tpe_base"] = tpe(base_ppl)
    return summary | {"rows": rows, "settings": settings, "wall_seconds": time.perf_counter() - started}
