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

from dataclasses import dataclass, fields

from ..util.enums import StrEnum
from .tpe import tpe

BYTE_TOLERANCE = 0.02


def byte_matched(control_bytes: int, point_bytes: int) -> bool:
    return control_bytes <= point_bytes * (1.0 + BYTE_TOLERANCE)


def charged_tpe(ppl: float, total_bytes: int, base_bytes: int) -> float:
    """TPE with the bytes beyond the base model counted as theta bytes (0 for the base itself)."""
    return tpe(ppl, max(0, int(total_bytes) - int(base_bytes)), base_bytes)


class Metric(StrEnum):
    """What a verdict compares (lower is better for both)."""

    KLD_MEAN = "kld_mean"
    PPL = "ppl"


def quality_metric(rows: list[dict]) -> Metric:
    """kld_mean when every row has it, else ppl."""
    return Metric.KLD_MEAN if rows and all(r.get("kld_mean") is not None for r in rows) else Metric.PPL


@dataclass(frozen=True)
class ControlVerdict:
    """A theta point against its best byte-matched plain model (the control)."""

    label: str  # the control's
    bytes: int
    bytes_ratio: float  # control bytes / point bytes
    metric: Metric
    value: float  # the control's metric
    point_value: float
    beaten: bool  # the control is better on the metric
    ppl: float
    point_ppl: float
    beaten_on_ppl: bool
    kld_mean: float | None = None  # the KLD trio only when both sides measured it
    point_kld_mean: float | None = None
    beaten_on_kld: bool | None = None

    def to_dict(self) -> dict:
        """As JSON results hold it: the KLD trio only where measured."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.kld_mean is None:
            for key in ("kld_mean", "point_kld_mean", "beaten_on_kld"):
                del out[key]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ControlVerdict:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def sentence(self, point_label: str) -> str:
        """One plain sentence: on the frontier, or beaten and by which control."""
        parts = [f"PPL {self.point_ppl:.3f} vs {self.ppl:.3f}"]
        if self.kld_mean is not None:
            parts.append(f"KLD {self.point_kld_mean:.4f} vs {self.kld_mean:.4f}")
        figures = ", ".join(parts) + f"; control at {self.bytes_ratio:.3f}x the bytes"
        if self.beaten:
            return f"{point_label}: BEATEN by {self.label} ({figures})"
        if self.beaten_on_ppl:
            return f"{point_label}: beats {self.label} on KLD but NOT on PPL ({figures})"
        return f"{point_label}: beats the best byte-matched control {self.label} ({figures})"


def control_verdict(point: dict, plain_rows: list[dict]) -> ControlVerdict | None:
    """The verdict for one theta point against the byte-matched plain models; None if there are none.

    `point` and each row need "label", "bytes", "ppl" (and "kld_mean" when measured).
    """
    matched = [r for r in plain_rows if r["label"] != point["label"] and byte_matched(r["bytes"], point["bytes"])]
    if not matched:
        return None
    metric = quality_metric(matched + [point])
    control = min(matched, key=lambda r: r[metric])
    kld = control.get("kld_mean") is not None and point.get("kld_mean") is not None
    return ControlVerdict(
        label=control["label"], bytes=control["bytes"], bytes_ratio=control["bytes"] / point["bytes"], metric=metric,
        value=control[metric], point_value=point[metric], beaten=control[metric] < point[metric],
        ppl=control["ppl"], point_ppl=point["ppl"], beaten_on_ppl=control["ppl"] < point["ppl"],
        kld_mean=control["kld_mean"] if kld else None, point_kld_mean=point["kld_mean"] if kld else None,
        beaten_on_kld=control["kld_mean"] < point["kld_mean"] if kld else None,
    )


def best_control(point: dict, plain_rows: list[dict]) -> dict | None:
    """control_verdict as a JSON record (nkat ppl's rows are records of figures)."""
    verdict = control_verdict(point, plain_rows)
    return verdict.to_dict() if verdict is not None else None


def verdict_line(point_label: str, control: ControlVerdict | dict | None) -> str:
    """One plain sentence: on the frontier, or beaten and by which control."""
    if control is None:
        return f"{point_label}: no plain model at <= {100 * (1 + BYTE_TOLERANCE):.0f} % of its bytes was scored"
    if isinstance(control, dict):
        control = ControlVerdict.from_dict(control)
    return control.sentence(point_label)
