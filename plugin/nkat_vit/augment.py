"""Batch augmentations in plain torch, driven by an explicit torch.Generator (so an epoch's
augmentations are reproducible from (seed, epoch) and a resumed run sees the same images).

  random_crop   zero-pad by `pad` and crop back at a random offset per image
  flip          horizontal flip with probability 1/2 (only where the dataset allows it)
  rand_augment  RandAugment (N ops of magnitude M out of 30) with a subset of its operations:
                identity, rotate, shear x/y, translate x/y, brightness, contrast, solarize,
                posterize, autocontrast (one affine grid_sample for the geometric ones)
  cutout        zero a square of side `size` at a random place per image
  mix           per batch: CutMix with probability p_cutmix, else Mixup with probability p_mixup;
                the mixing ratio is uniform in (0, 1) (Beta(1, 1)); returns (x, y_a, y_b, lam)
Images are float in [0, 1], shape (B, C, H, W).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

RA_OPS = ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "contrast",
          "solarize", "posterize", "autocontrast")
_MAX_MAGNITUDE = 30.0


def _uniform(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


def flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mask = (_uniform(len(x), gen) < 0.5)[:, None, None, None]
    return torch.where(mask, x.flip(3), x)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=gen)
    cx = torch.randint(0, w, (b,), generator=gen)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    half = size // 2
    inside = ((rows - cy[:, None, None]).abs() <= half - (size % 2 == 0)) & (
        (cols - cx[:, None, None]).abs() <= half - (size % 2 == 0))
    return x * (~inside)[:, None].to(x.dtype)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rand_augment(x: torch.Tensor, n_ops: int, magnitude: float, gen: torch.Generator) -> torch.Tensor:
    """RandAugment subset: each image gets n_ops random operations at the given magnitude."""
    if n_ops <= 0:
        return x
    b = len(x)
    m = min(float(magnitude), _MAX_MAGNITUDE) / _MAX_MAGNITUDE
    for _ in range(n_ops):
        op = torch.randint(0, len(RA_OPS), (b,), generator=gen)
        sign = torch.where(_uniform(b, gen) < 0.5, -1.0, 1.0)
        eye = torch.eye(2, 3).repeat(b, 1, 1)
        theta = eye.clone()
        angle = sign * math.radians(30.0) * m
        is_ = {name: (op == i) for i, name in enumerate(RA_OPS)}
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1)
        theta = torch.where(is_["rotate"][:, None, None], rot, theta)
        theta[:, 0, 1] = torch.where(is_["shear_x"], sign * 0.3 * m, theta[:, 0, 1])
        theta[:, 1, 0] = torch.where(is_["shear_y"], sign * 0.3 * m, theta[:, 1, 0])
        # translation in normalized coordinates: 0.45 of the half-width at full magnitude
        theta[:, 0, 2] = torch.where(is_["translate_x"], sign * 0.45 * m, theta[:, 0, 2])
        theta[:, 1, 2] = torch.where(is_["translate_y"], sign * 0.45 * m, theta[:, 1, 2])
        geometric = (is_["rotate"] | is_["shear_x"] | is_["shear_y"] | is_["translate_x"] | is_["translate_y"])
        if geometric.any():
            x = torch.where(geometric[:, None, None, None], _affine(x, theta), x)
        factor = (1.0 + sign * 0.9 * m)[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        low = x.amin(dim=(2, 3), keepdim=True)
        high = x.amax(dim=(2, 3), keepdim=True)
        levels = 2.0 ** (8 - int(round(4 * m)))
        candidates = {
            "brightness": (x * factor).clamp(0, 1),
            "contrast": (mean + factor * (x - mean)).clamp(0, 1),
            "solarize": torch.where(x >= 1.0 - m, 1.0 - x, x),
            "posterize": torch.floor(x * (levels - 1) + 0.5) / (levels - 1),
            "autocontrast": ((x - low) / (high - low).clamp_min(1e-3)).clamp(0, 1),
        }
        for name, value in candidates.items():
            x = torch.where(is_[name][:, None, None, None], value, x)
    return x


def mix(x: torch.Tensor, y: torch.Tensor, p_cutmix: float, p_mixup: float, gen: torch.Generator):
    """CutMix or Mixup on a batch: (x, y_a, y_b, lam), the loss is lam*CE(y_a) + (1-lam)*CE(y_b)."""
    r = float(_uniform(1, gen))
    if r >= p_cutmix + p_mixup:
        return x, y, y, 1.0
    perm = torch.randperm(len(x), generator=gen)
    lam = float(_uniform(1, gen))
    if r < p_cutmix:
        _, _, h, w = x.shape
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, y, y[perm], lam
