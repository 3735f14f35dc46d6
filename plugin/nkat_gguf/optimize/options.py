"""What a user asks of nkat optimize: the options, the modes and their trial budgets."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BadSetting, Setting
from ..runtime.settings import RuntimeSettings

MODES = {"quick": 12, "full": 100}
DEFAULT_CHUNKS = 2
DEFAULT_FINAL_CHUNKS = 8
DEFAULT_STUDY_NAME = "nkat"


@dataclass
class OptimizeOptions:
    model: str
    output_dir: str
    text: str
    reference: str | None = None
    imatrix: str | None = None
    covariance: str | None = None
    mode: str = "quick"
    trials: int | None = None
    storage: str | None = None
    study_name: str = DEFAULT_STUDY_NAME
    target_rank: int | None = None
    max_kld: float | None = None
    max_overhead: float | None = None
    chunks: int = DEFAULT_CHUNKS
    final_chunks: int = DEFAULT_FINAL_CHUNKS
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)  # ctx, threads, flash_attn, backend
    seed: int | None = None
    quiet: bool = False
    given_theta: str | None = None  # --model X.nkat: X is scored beside the best trial in the final check
    extra: dict = field(default_factory=dict)


def trial_budget(mode: str, trials: int | None) -> int:
    """quick = 12, full = 100, custom = --trials."""
    if mode == "custom":
        if trials is None or trials <= 0:
            raise BadSetting(Setting.MODE, "custom needs", Setting.TRIALS, "N (a positive number)")
        return int(trials)
    if mode not in MODES:
        raise BadSetting(Setting.MODE, f"must be quick, full or custom, not {mode!r}")
    if trials is not None:
        raise BadSetting(Setting.TRIALS, "is for", Setting.MODE, "custom (", Setting.MODE,
                         f"{mode} runs {MODES[mode]} trials)")
    return MODES[mode]
