"""Per-tensor allocation: which llama.cpp type each tensor gets for a byte budget.

candidates (types llama.cpp can write for a tensor), costs (exact bytes and the output error of
each type, measured with ggml's own quantizers on sampled rows), allocate (convex hulls and one
Lagrangian sweep over every budget; numpy only), recipe_file (llama-quantize --tensor-type-file
syntax), mix (the run: statistics -> costs -> allocation -> llama.cpp's quantizer -> checks ->
scores). The frontier's mixed-precision controls and `nkat mix` both use it.
Imports: `errors`, `util`, `formats`, `theta`, `runtime`, and `measure`'s scorer (same layer).
"""
