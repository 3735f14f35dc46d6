"""The TPE formula, the one home of it, for the GGUF side (measure, optimize) and the vision side
(nkat_vit imports this small module alone):

  TPE = quality / log10(1 + lambda),  lambda = 9 * (1 + rho)

quality is 1/PPL (GGUF) or accuracy (vision); rho is the model's relative size.
"""

from __future__ import annotations

import math


def tpe_lambda(rho: float) -> float:
    """The TPE complexity term lambda = 9 * (1 + rho), rho the model's relative size.

    GGUF: rho = theta bytes / base file bytes. Vision (nkat_vit): rho = parameters in millions.
    rho = 0 gives log10(1 + lambda) = 1, so TPE is then the quality measure itself.
    """
    return 9.0 * (1.0 + rho)


def tpe_score(quality: float, rho: float) -> float:
    """TPE = quality / log10(1 + lambda(rho)); quality is 1/PPL (GGUF) or accuracy (vision)."""
    return quality / math.log10(1.0 + tpe_lambda(rho))


def tpe(ppl: float, theta_bytes: int = 0, base_bytes: int = 1) -> float:
    """The project's TPE score: (1/PPL) / log10(1 + lambda), lambda = 9 * (1 + rho).

    rho = theta bytes / base model file bytes; with no theta the denominator is log10(10) = 1,
    so TPE = 1/PPL. (The seed's TPE divided by zero for a model without theta; the 1 + rho in
    lambda keeps that denominator at 1.)
    """
    rho = theta_bytes / base_bytes if base_bytes else 0.0
    return tpe_score(1.0 / ppl, rho)
