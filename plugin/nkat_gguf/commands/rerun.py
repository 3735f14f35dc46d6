"""The commands that redo nkat optimize's best trial, in the CLI's words: the nkat convert that
writes its theta, the nkat ppl that scores it and the nkat optimize that resumes its study
(optimize/outputs.py prints them into optimal_*.json through OptimizeReport.rerun)."""

from __future__ import annotations

import shlex

from ..optimize.options import OptimizeOptions
from ..optimize.outputs import RerunFacts, best_stem
from ..formats.roles import role_globs
from ..optimize.space import GROUPS, THETA_TYPE
from ..util.study_storage import redact
from ..theta.lowrank import StatisticsKind, source_info


def rerun_commands(facts: RerunFacts) -> dict:
    o, row = facts.opts, facts.row
    p = row["params"]
    nkat_path = str(facts.nkat_path or f"{best_stem(row)}.nkat")
    convert = ["nkat", "convert", "--model", o.model]
    if o.reference:
        convert += ["--reference", o.reference]
    statistics = source_info(p["source"]).statistics
    if o.imatrix and statistics == StatisticsKind.DIAGONAL:
        convert += ["--imatrix", o.imatrix]
    if o.covariance and statistics == StatisticsKind.COVARIANCE:
        convert += ["--covariance", o.covariance]
    convert += ["--source", p["source"], "--structure", p["structure"], "--theta-rank", str(p["rank"]),
                "--theta-gamma", repr(p["gamma"]), "--theta-type", THETA_TYPE]
    if facts.budget_bytes is not None:
        # budget / 2**20 is exact in binary, so --budget-mb gives back these very bytes
        convert += ["--budget-mb", repr(facts.budget_bytes / 2**20)]
    if set(p["groups"]) != set(GROUPS):
        convert += ["--selective-layers", *role_globs(p["groups"])]
    convert += ["--output", nkat_path]
    ppl = ["nkat", "ppl", "--model", o.model, "--theta", nkat_path, "--text", o.text, "--ctx", str(o.runtime.ctx),
           "--chunks", str(row["chunks"]), "--backend", o.runtime.backend]
    if o.reference:
        ppl += ["--reference", o.reference]
    if o.runtime.flash_attn:
        ppl += ["--flash-attn"]
    return {
        "command": shlex.join(ppl),
        "convert_command": shlex.join(convert),
        "convert_note": "nkat convert takes the SVD at this rank directly; the study truncated one taken at "
                        f"rank {facts.max_rank}, so its theta can differ in the last digits",
        "study_command": shlex.join(study_command(o, facts.n_trials)),
    }


def study_command(o: OptimizeOptions, n_trials: int) -> list[str]:
    """The nkat optimize command that resumes this study (its storage password redacted)."""
    cmd = ["nkat", "optimize", "--model", o.model, "--text", o.text, "--mode", o.mode]
    if o.mode == "custom":
        cmd += ["--trials", str(n_trials)]
    for flag, value in (("--reference", o.reference), ("--imatrix", o.imatrix), ("--covariance", o.covariance),
                        ("--target-rank", o.target_rank),
                        ("--max-kld", o.max_kld), ("--max-overhead", o.max_overhead), ("--storage", o.storage)):
        if value is not None:
            cmd += [flag, redact(str(value)) if flag == "--storage" else str(value)]
    cmd += ["--output-dir", o.output_dir, "--study-name", o.study_name, "--backend", o.runtime.backend,
            "--chunks", str(o.chunks), "--final-chunks", str(o.final_chunks), "--ctx", str(o.runtime.ctx)]
    if o.runtime.flash_attn:
        cmd.append("--flash-attn")
    return cmd
