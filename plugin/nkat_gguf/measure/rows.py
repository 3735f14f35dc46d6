"""The one row builder: a scored model's bytes, rho, TPE and gap recovered, as every command
reports them (`nkat ppl`, the optimizer's trials and its final check)."""

from __future__ import annotations

from .byte_control import charged_tpe
from .evaluate import gap_recovered


def pick(result: dict, keys) -> dict:
    """The named figures of an evaluator result (None for those not measured)."""
    return {k: result.get(k) for k in keys}


def score_row(result: dict, base_bytes: int, theta_bytes: int = 0, model_bytes: int | None = None,
              base_ppl: float | None = None, reference_ppl: float | None = None) -> dict:
    """`result` (ppl, ...) with model_bytes, theta_bytes, bytes, rho and TPE charged for every byte
    beyond the base model; with `base_ppl`, gap_recovered too (None without a reference).

    model_bytes is the plain model's file (the base when None); theta_bytes are added on top."""
    model_bytes = int(base_bytes if model_bytes is None else model_bytes)
    theta_bytes = int(theta_bytes)
    total = model_bytes + theta_bytes
    row = {"model_bytes": model_bytes, "theta_bytes": theta_bytes, "bytes": total, "rho": theta_bytes / model_bytes,
           "tpe": charged_tpe(result["ppl"], total, base_bytes)} | result
    if base_ppl is not None:
        row["gap_recovered"] = (gap_recovered(base_ppl, result["ppl"], reference_ppl)
                                if reference_ppl is not None else None)
    return row
