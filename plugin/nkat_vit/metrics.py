"""Scores: lambda, TPE, Global TPE, Consistency, Robustness (defined here, once).

  rho          = parameters / 10^6 (the model's size in millions of parameters)
  lambda       = 9 * (1 + rho)                            nkat_gguf.measure.tpe.tpe_lambda
  TPE_d        = accuracy_d / log10(1 + lambda_d)         nkat_gguf.measure.tpe.tpe_score
  Global TPE   = mean_d accuracy_d / log10(1 + lambda_bar), lambda_bar from the mean parameter
                 count of the per-dataset models (they differ only in input channels and classes)
  Consistency  = 1 - std_d(TPE_d) / mean_d(TPE_d)          (population std; needs >= 2 datasets)
  Robustness   = mean_c accuracy(corruption c) / clean accuracy, over CORRUPTIONS below
                 (fixed parameters, fixed seed: the same corrupted test set every run)

Why: lambda uses the GGUF side's form so that a model of no size scores its bare accuracy and
TPE falls off logarithmically with size; the issue's targets (MNIST 0.91 / 0.69, Fashion-MNIST
0.87 / 0.67, EMNIST 0.75 / 0.60, CIFAR-10 0.60 / 0.45) all imply log10(1 + lambda) of 1.25-1.33,
i.e. lambda of 17-21, about a one-million-parameter model under this definition. Consistency is
one minus the coefficient of variation, so it is 1 when every dataset scores the same TPE and is
scale-free. Robustness is a ratio to the clean accuracy so it measures the drop, not the level.
"""

from __future__ import annotations

import math
import statistics

import torch
from nkat_gguf.measure.tpe import tpe_lambda, tpe_score
from torch.nn import functional as F

CORRUPTION_SEED = 1234
# name -> description (parameters are fixed; see corrupt())
CORRUPTIONS = {
    "gaussian_noise": "add N(0, 0.1^2) to pixels in [0, 1], clip",
    "blur": "3x3 Gaussian blur, sigma 1",
    "contrast": "halve the contrast around each image's mean",
    "shift": "translate by size/14 pixels (at least 1) right and down, zero fill",
    "occlusion": "zero a square of side size/4 at a seeded random place per image",
}


def rho(parameters: int) -> float:
    return parameters / 1e6


def complexity(parameters: int) -> float:
    """lambda for a model with this many parameters."""
    return tpe_lambda(rho(parameters))


def tpe(accuracy: float, parameters: int) -> float:
    return tpe_score(accuracy, rho(parameters))


def global_tpe(accuracies: dict[str, float], parameters: dict[str, int]) -> float:
    mean_params = statistics.fmean(parameters[d] for d in accuracies)
    return tpe_score(statistics.fmean(accuracies.values()), rho(mean_params))


def consistency(tpes: dict[str, float]) -> float | None:
    values = list(tpes.values())
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return 1.0 - statistics.pstdev(values) / mean if mean > 0 else 0.0


def robustness(clean: float, corrupted: dict[str, float]) -> float | None:
    if not corrupted or clean <= 0:
        return None
    return statistics.fmean(corrupted.values()) / clean


def corrupt(x: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """One corruption of a batch of images in [0, 1], shape (B, C, H, W)."""
    b, c, h, w = x.shape
    if name == "gaussian_noise":
        return (x + 0.1 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    if name == "blur":
        k = torch.tensor([math.exp(-1 / 2), 1.0, math.exp(-1 / 2)])
        k = torch.outer(k, k)
        k = (k / k.sum()).expand(c, 1, 3, 3).to(x.dtype)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    if name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return mean + 0.5 * (x - mean)
    if name == "shift":
        s = max(1, round(h / 14))
        return F.pad(x, (s, 0, s, 0))[:, :, :h, :w]
    if name == "occlusion":
        side = max(1, h // 4)
        top = torch.randint(0, h - side + 1, (b,), generator=generator)
        left = torch.randint(0, w - side + 1, (b,), generator=generator)
        rows = torch.arange(h)[None, :, None]
        cols = torch.arange(w)[None, None, :]
        inside = ((rows >= top[:, None, None]) & (rows < (top + side)[:, None, None])
                  & (cols >= left[:, None, None]) & (cols < (left + side)[:, None, None]))
        return x * (~inside)[:, None].to(x.dtype)
    raise ValueError(f"unknown corruption {name!r}")
