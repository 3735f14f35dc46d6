"""Candidate types per tensor: every type llama-cpp-python's quantizer can write for its shape.

A type is a candidate for a tensor when its block divides the tensor's rows (else llama.cpp would
fall back to another type) and, for the types llama.cpp refuses to write without importance
weights, when the tensor has an imatrix entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..runtime.ggml_quants import block_size

# Real GGML types llama.cpp 0.3.36's quantizer writes, cheapest first (roughly).
CANDIDATE_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS",
                   "IQ4_NL", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "F16")
# `--types fast`: no i-quants. On CPU their matmuls are the slow ones: a mix of mostly IQ3_S generated
# 0.61x the tokens/s of Q3_K_S on an AVX-512 EPYC (docs/RESULTS.md); the k-quants and the legacy types
# run at about the speed of llama.cpp's k-quant files.
FAST_TYPES = tuple(t for t in CANDIDATE_TYPES if not t.startswith("IQ"))
TYPE_PRESETS = {"all": CANDIDATE_TYPES, "fast": FAST_TYPES}
# llama-quant.cpp's tensor_type_requires_imatrix: it stops with "Missing importance matrix" for these.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
# File types (llama-quantize's names) that write such tensors: the types above, IQ2_M (IQ2_S
# tensors) and Q2_K_S (whose Q2_K tensors need it too, under that file type).
FTYPES_NEEDING_IMATRIX = NEEDS_IMATRIX | {"IQ2_M", "Q2_K_S"}
# 2-D weights llama.cpp never quantizes (llama-quant.cpp's exclusions), besides norms.
_NOT_QUANTIZED = re.compile(r"(_norm|\.norm|ffn_gate_inp|pos_embd|token_types|ssm_conv1d|ssm_x|ssm_dt|"
                            r"time_mix|attn_rel_b|per_layer_token_embd)")


@dataclass(frozen=True)
class TensorShape:
    name: str
    n_out: int  # rows
    n_in: int  # elements per row

    @property
    def n_weights(self) -> int:
        return self.n_out * self.n_in


def is_allocated(name: str, n_dims: int) -> bool:
    """The tensors a recipe assigns: 2-D weights that llama.cpp quantizes (block matrices,
    token_embd, output)."""
    return n_dims == 2 and name.endswith(".weight") and not _NOT_QUANTIZED.search(name)


def candidate_types(shape: TensorShape, has_importance: bool, types=CANDIDATE_TYPES) -> list[str]:
    """The types llama.cpp can write for this tensor, as given in `types` order."""
    out = []
    for t in types:
        if shape.n_in % block_size(t):
            continue
        if t in NEEDS_IMATRIX and not has_importance:
            continue
        out.append(t)
    return out


def check_types(types) -> list[str]:
    """The given type names, upper-cased, presets ('all', 'fast') expanded; an error names the first
    one that is not a candidate type."""
    from ..errors import UserError

    out = []
    for t in types:
        out += TYPE_PRESETS.get(str(t).lower(), [str(t).upper()])
    out = list(dict.fromkeys(out))
    for t in out:
        if t not in CANDIDATE_TYPES:
            raise UserError(f"type {t!r} is not one llama.cpp writes per tensor; one of: {', '.join(CANDIDATE_TYPES)}, "
                            f"or a preset: {', '.join(TYPE_PRESETS)}")
    if not out:
        raise UserError("no candidate types given")
    return out
