"""NKAT-ViT: the vision side of NKAT (PyTorch).

A vision transformer whose linear layers carry the NKAT star-product
    y = W x + b + 0.5 * s_l * (theta x),   s_l = nkat_strength * nkat_decay^l,
with theta a learnable low-rank matrix per layer (antisymmetric where the layer is square):
the same algebra as the GGUF side's theta, trained instead of derived from a quantization error.

Modules, bottom to top: star (the layer), model (the ViT), data (dataset readers), augment,
metrics (lambda, TPE, Consistency, Robustness), train (loop, EMA, checkpoints), optimize (the
two-stage Optuna search). Shared with nkat_gguf: the TPE formula and the Optuna storage helpers.
The GGUF side never imports this package (torch is an optional extra, `[vit]`).
"""
