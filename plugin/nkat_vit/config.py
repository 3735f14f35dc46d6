"""Model and training settings (plain dataclasses; no torch, so the CLI can show defaults
and validate flags without importing it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from nkat_gguf.errors import UserError

STEMS = ("off", "tiny", "small")


@dataclass
class ViTConfig:
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    # defaults: the digits smoke model (measured >= 0.95 there in under 2 min on 1 shared core)
    patch: int = 1
    stem: str = "tiny"         # off | tiny (2 strided convs, 32 -> 64 ch) | small (tiny + a 3x3 conv)
    dim: int = 32
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 2.0
    attn_dropout: float = 0.0
    emb_dropout: float = 0.0
    temperature: float = 1.0   # softmax(q k^T / (sqrt(d_head) * temperature))
    top_k: int = 0             # keep the k largest attention weights per query (0 = all)
    top_p: float = 1.0         # keep the smallest set of keys with cumulative weight >= p (1 = all)
    color_norm: bool = False   # per-pixel LayerNorm over the color channels (needs >= 2 channels)
    nkat_strength: float = 0.0024
    nkat_decay: float = 0.99
    nkat_rank: int = 4

    def validate(self) -> None:
        if self.stem not in STEMS:
            raise UserError(f"stem must be one of {', '.join(STEMS)}, not {self.stem!r}")
        for name in ("image_size", "in_channels", "num_classes", "patch", "dim", "depth", "heads"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"{name} must be a positive integer, not {getattr(self, name)}")
        if self.dim % self.heads:
            raise UserError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if not 0 < self.temperature <= 10:
            raise UserError(f"temperature must be in (0, 10], not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, not {self.top_k}")
        if self.nkat_rank < 0:
            raise UserError(f"nkat_rank must be >= 0, not {self.nkat_rank}")
        if not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise UserError(f"mlp_ratio must be a positive number, not {self.mlp_ratio}")
        for name in ("attn_dropout", "emb_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        check_strength(self.nkat_strength, self.nkat_decay)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown model setting(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    ema: float = 0.999          # 0 = off; the first updates use min(ema, (1+t)/(10+t)) so short runs benefit
    clip: float = 1.0           # gradient norm clip (0 = off)
    crop_pad: int = -1          # -1 = image_size // 8
    flip: bool = True           # only where the dataset allows it (not digits or letters)
    randaugment_n: int = 0
    randaugment_m: float = 9.0
    cutmix: float = 0.0
    mixup: float = 0.0
    cutout: int = 0
    seed: int = 0

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', ' ')} must be positive, not {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise UserError(f"lr must be > 0 and min lr in [0, lr], not {self.lr} / {self.min_lr}")
        if not 0 <= self.ema < 1:
            raise UserError(f"ema must be in [0, 1), not {self.ema}")
        if self.cutmix < 0 or self.mixup < 0 or self.cutmix + self.mixup > 1:
            raise UserError(f"cutmix and mixup are per-batch probabilities summing to <= 1, not {self.cutmix} + {self.mixup}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label smoothing must be in [0, 1), not {self.label_smoothing}")
        for name in ("weight_decay", "warmup_epochs", "clip", "cutout", "randaugment_n"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{name.replace('_', ' ')} must be 0 or more, not {value}")
        if self.crop_pad < -1:
            raise UserError(f"crop pad must be -1 (image size / 8), 0 (off) or more, not {self.crop_pad}")
        if not 0 <= self.randaugment_m <= 30:
            raise UserError(f"randaugment magnitude must be in [0, 30], not {self.randaugment_m}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_strength(strength: float, decay: float) -> None:
    if not math.isfinite(strength) or strength < 0:
        raise UserError(f"nkat_strength must be a finite number >= 0, not {strength}")
    if not math.isfinite(decay) or not 0 < decay <= 1:
        raise UserError(f"nkat_decay must be in (0, 1], not {decay}")
