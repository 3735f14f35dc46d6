"""The one byte-matched-control rule used by `nkat ppl`, `nkat optimize`, `quickstart` and `nkat frontier`.

A theta point (model + theta) must be compared with the best plain model a user could buy with
the same bytes. The rule:
- byte-matched: a plain model whose file is at most BYTE_TOLERANCE larger than the point's bytes
  (model + theta). Smaller models always qualify: a point that loses to something smaller loses.
- the best control is the byte-matched model with the lowest KL-divergence from the reference when
  KLD was measured (the steadier measure), else the lowest perplexity;
- TPE charges every byte beyond the base model the way theta bytes are charged, for theta points
  and controls alike, so the same model gets the same TPE in every command.
"""

from __future__ import annotations

from .tpe import tpe

BYTE_TOLERANCE = 0.02


def byte_matched(control_bytes: int, point_bytes: int) -> bool:
    return control_bytes <= point_bytes * (1.0 + BYTE_TOLERANCE)


def charged_tpe(ppl: float, total_bytes: int, base_bytes: int) -> float:
    """TPE with the bytes beyond the base model counted as theta bytes (0 for the base itself)."""
    return tpe(ppl, max(0, int(total_bytes) - int(base_bytes)), base_bytes)


def quality_metric(rows: list[dict]) -> str:
    """kld_mean when every row has it, else ppl (lower is better for both)."""
    return "kld_mean" if rows and all(r.get("kld_mean") is not None for r in rows) else "ppl"


def best_control(point: dict, plain_rows: list[dict]) -> dict | None:
    """The verdict for one theta point against the byte-matched plain models; None if there are none.

    `point` and each row need "label", "bytes", "ppl" (and "kld_mean" when measured).
    """
    matched = [r for r in plain_rows if r["label"] != point["label"] and byte_matched(r["bytes"], point["bytes"])]
    if not matched:
        return None
    metric = quality_metric(matched + [point])
    control = min(matched, key=lambda r: r[metric])
    out = {
        "label": control["label"],
        "bytes": control["bytes"],
        "bytes_ratio": control["bytes"] / point["bytes"],
        "metric": metric,
        "value": control[metric],
        "point_value": point[metric],
        "beaten": control[metric] < point[metric],
        "ppl": control["ppl"],
        "point_ppl": point["ppl"],
        "beaten_on_ppl": control["ppl"] < point["ppl"],
    }
    if control.get("kld_mean") is not None and point.get("kld_mean") is not None:
        out["kld_mean"] = control["kld_mean"]
        out["point_kld_mean"] = point["kld_mean"]
        out["beaten_on_kld"] = control["kld_mean"] < point["kld_mean"]
    return out


def verdict_line(point_label: str, control: dict | None) -> str:
    """One plain sentence: on the frontier, or beaten and by which control."""
    if control is None:
        return f"{point_label}: no plain model at <= {100 * (1 + BYTE_TOLERANCE):.0f} % of its bytes was scored"
    parts = [f"PPL {control['point_ppl']:.3f} vs {control['ppl']:.3f}"]
    if "kld_mean" in control:
        parts.append(f"KLD {control['point_kld_mean']:.4f} vs {control['kld_mean']:.4f}")
    figures = ", ".join(parts) + f"; control at {control['bytes_ratio']:.3f}x the bytes"
    if control["beaten"]:
        return f"{point_label}: BEATEN by {control['label']} ({figures})"
    if control["beaten_on_ppl"]:
        return (f"{point_label}: beats {control['label']} on KLD but NOT on PPL ({figures})")
    return f"{point_label}: beats the best byte-matched control {control['label']} ({figures})"
