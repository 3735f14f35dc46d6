"""Measurement: the scorer (PPL, KLD, top-1, TPE), the byte-matched-control rule, perplexity runs
and theta checks, throughput benchmarks, the quality-per-byte frontier and per-tensor attribution.
Imports: `errors`, `util`, `formats`, `theta`, `runtime`."""
