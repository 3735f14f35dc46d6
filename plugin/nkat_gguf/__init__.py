"""NKAT-GGUF: low-rank INT8 corrections (theta) for quantized GGUF models, measured honestly."""

__version__ = "0.1.0"
