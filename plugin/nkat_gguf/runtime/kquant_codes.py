"""Where the integer codes of llama.cpp's k-quants sit in a 256-element super-block, so that GPTQ
can choose the codes of a block whose scales ggml has set (runtime/gptq.round_columns).

Each element's code is a few bit fields of the block: (byte, shift, width, position in the code).
The layouts follow ggml's dequantize_row_q{2..6}_K (block_q2_K ... block_q6_K in ggml-common.h);
tests/test_gptq.py checks them against ggml's own dequantization. In every k-quant an element
dequantizes to an affine function of its code, value = step * code + offset, with step and offset
fixed by the block's scales: `affine` reads them off ggml's dequantization of all-0 and all-1 codes,
so nothing here decodes a scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType as T

from .ggml_quants import dequantize_rows, ggml_type

QK_K = 256


@dataclass(frozen=True)
class CodeLayout:
    block_bytes: int
    bits: int        # code width: codes are 0 .. 2**bits - 1
    fields: tuple    # per field: (byte[256], shift[256], width, position in the code)


@lru_cache(maxsize=1)
def layouts() -> dict:
    e = np.arange(QK_K)
    n, j, l = e // 128, (e // 32) % 4, e % 32  # Q2_K/Q3_K/Q6_K: half n, quarter j, lane l
    c, h = e // 64, (e // 32) % 2               # Q4_K/Q5_K: chunk c of 64, half h of it
    low2 = lambda at: (at + n * 32 + l, 2 * j, 2, 0)    # 2 bits: byte at + n*32 + l, bit 2j
    low4 = lambda at: (at + c * 32 + l, 4 * h, 4, 0)    # 4 bits: byte at + c*32 + l, nibble h
    return {
        T.Q2_K: CodeLayout(84, 2, (low2(16),)),
        T.Q3_K: CodeLayout(110, 3, (low2(32), (l, n * 4 + j, 1, 2))),       # hmask bit n*4 + j
        T.Q4_K: CodeLayout(144, 4, (low4(16),)),
        T.Q5_K: CodeLayout(176, 5, (low4(48), (16 + l, 2 * c + h, 1, 4))),  # qh bit 2c + h
        # Q6_K: ql byte n*64 + (j % 2)*32 + l, nibble j // 2; qh byte 128 + n*32 + l, bits 2j
        T.Q6_K: CodeLayout(210, 6, ((n * 64 + (j % 2) * 32 + l, 4 * (j // 2), 4, 0),
                                    (128 + n * 32 + l, 2 * j, 2, 4))),
    }


def layout(qtype) -> CodeLayout | None:
    """The code layout of a k-quant; None for every other type."""
    return layouts().get(ggml_type(qtype))


def codes_of(qtype, blocks: np.ndarray) -> np.ndarray:
    """(n, block_bytes) uint8 blocks -> (n, 256) int32 codes."""
    out = np.zeros((blocks.shape[0], QK_K), dtype=np.int32)
    for byte, shift, width, pos in layout(qtype).fields:
        out |= ((blocks[:, byte].astype(np.int32) >> shift) & ((1 << width) - 1)) << pos
    return out


def with_codes(qtype, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """A copy of blocks (n, block_bytes) whose codes are `codes` (n, 256); scales untouched."""
    out = blocks.copy()
    codes = np.asarray(codes, dtype=np.int32)
    for byte, shift, width, pos in layout(qtype).fields:
        mask = (1 << width) - 1
        value = (codes >> pos) & mask
        for s in np.unique(shift):  # the elements at one shift sit in distinct bytes
            at = shift == s
            kept = out[:, byte[at]] & np.uint8(~(mask << s) & 0xFF)
            out[:, byte[at]] = kept | (value[:, at] << s).astype(np.uint8)
    return out


def affine(qtype, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step, offset), each (n, 256) float64: element k of row r dequantizes to
    step[r, k] * code + offset[r, k] under the block's scales (ggml's own dequantization)."""
    zero = dequantize_rows(qtype, with_codes(qtype, blocks, np.zeros((blocks.shape[0], QK_K))), QK_K)
    one = dequantize_rows(qtype, with_codes(qtype, blocks, np.ones((blocks.shape[0], QK_K))), QK_K)
    return one.astype(np.float64) - zero, zero.astype(np.float64)
