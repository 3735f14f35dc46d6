"""Where the damage is: the share of a quantized model's KL-divergence each tensor group causes.

For each group (token_embd, output, attn_q/k/v/output, ffn_gate/up/down, and ranges of blocks),
a GGUF is assembled from the base with that group's tensors taken from the reference as stored
(gguf_assemble), and scored against the reference on the same chunks as the base. The share of
the base's KLD the restoration removes, and its byte cost, say what quantization cost where.
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .scoring import RowKind, ScoredRow, score_rows, settings_record
from ..formats.gguf_io import fingerprint_file, open_gguf
from ..formats.keys import NkatKeys
from ..formats.roles import MODEL_ROLES, ROLES as ROLE_GROUPS
from ..util.report import say
from ..runtime.settings import RuntimeSettings

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def group_members(names: list[str], group: str) -> list[str]:
    """Weight tensors of a group: a role (e.g. attn_q, token_embd) or a block range 'blk 0-6'."""
    weights = [n for n in names if n.endswith(".weight") and "norm" not in n]
    if group in MODEL_ROLES:
        return [n for n in weights if n == f"{group}.weight"]
    if group.startswith("blk "):
        lo, hi = (int(x) for x in group[4:].split("-"))
        return [n for n in weights if (m := _BLOCK.match(n)) and lo <= int(m.group(1)) <= hi]
    return [n for n in weights if _BLOCK.match(n) and n.split(".")[2] == group]


def _same_tensor(a, b) -> bool:
    """Stored identically: type, size and every byte (a requantized tensor can differ in data alone)."""
    return (a.tensor_type == b.tensor_type and a.n_bytes == b.n_bytes
            and np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)))


def block_ranges(n_blocks: int, parts: int) -> list[str]:
    step = -(-n_blocks // parts)
    return [f"blk {i}-{min(n_blocks, i + step) - 1}" for i in range(0, n_blocks, step)]


@dataclass
class AttributeOptions:
    base: str
    reference: str
    text: str
    work_dir: str
    groups: list[str] = field(default_factory=list)  # empty: roles + block quarters
    block_parts: int = 4
    chunks: int = 8
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)  # restored copies load without theta
    quiet: bool = False


def run_attribution(o: AttributeOptions) -> dict:
    started = time.perf_counter()
    for path in (o.base, o.reference, o.text):
        if not Path(path).is_file():
            raise UserError(f"file not found: {path}")
    base_t = {t.name: t for t in open_gguf(o.base).tensors}
    ref_t = {t.name: t for t in open_gguf(o.reference).tensors}
    if set(base_t) != set(ref_t):
        raise UserError(f"{o.base} and {o.reference} hold different tensors: not two quantizations of one model")
    names = list(base_t)
    n_blocks = 1 + max((int(m.group(1)) for n in names if (m := _BLOCK.match(n))), default=-1)
    groups = o.groups or [g for g in ROLE_GROUPS if group_members(names, g)] + block_ranges(n_blocks, o.block_parts)
    work = Path(o.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from ..formats.assemble import write_mixed

    base_fp = fingerprint_file(o.base)[:12]
    rows = [ScoredRow("base", RowKind.BASE, o.base)]
    for group in groups:
        members = group_members(names, group)
        if not members:
            raise UserError(f"group {group!r} matches no weight tensor of {o.base}")
        differing = [n for n in members if not _same_tensor(base_t[n], ref_t[n])]
        extra = sum(int(ref_t[n].n_bytes) - int(base_t[n].n_bytes) for n in members)
        row = ScoredRow(group, RowKind.RESTORED, o.base, facts={"group": group, "tensors": len(members),
                                                                "tensors_differing": len(differing), "extra_bytes": extra})
        if differing:  # else restoring changes no byte: the row is the base itself (its score is cached)
            path = work / f"restore-{base_fp}-{group.replace(' ', '').replace('-', '_')}.gguf"
            if not path.is_file():
                say(f"[attribute] assembling {o.base} with {group} from the reference ({len(members)} tensors)",
                    o.quiet)
                write_mixed(o.base, {n: o.reference for n in members}, path, {NkatKeys.Assembled.RESTORED: group})
            row.model = str(path)
        rows.append(row)
    n_chunks, runtime_settings = score_rows(rows, reference=o.reference, text=o.text, work=work, runtime=o.runtime,
                                            chunks=o.chunks, quiet=o.quiet)
    base = rows[0]
    figures = ("ppl", "ppl_err", "kld_mean", "kld_err", "kld_p99", "top1_agreement")
    out_groups = []
    for r in rows[1:]:
        share = (base.kld_mean - r.kld_mean) / base.kld_mean if base.kld_mean else float("nan")
        out_groups.append(r.facts | {k: r.figures[k] for k in figures} | {"share": share})
    return {
        "base": {k: base.figures[k] for k in figures} | {"bytes": base.model_bytes},
        "groups": out_groups,
        "settings": settings_record(o) | {"chunks_scored": n_chunks} | runtime_settings,
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
