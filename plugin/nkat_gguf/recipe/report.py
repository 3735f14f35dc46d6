"""`nkat mix`'s markdown: per budget, the mix beside the stock type nearest in size."""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20


def _num(value, digits=4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mix_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Mixes of {Path(s['reference']).name} (reference type {s['reference_type']}), imatrix "
             f"{Path(s['imatrix']).name}{', covariance ' + Path(s['covariance']).name if s['covariance'] else ''}; "
             f"costs on {s['rows']} sampled rows per tensor."]
    if s.get("gptq") and s.get("gptq_priced"):
        lines[0] += (f" GPTQ rounding under {Path(s['gptq']).name} (damping {s['gptq_damp']:g}) was offered as one more "
                     "option per block matrix and type: the type's bytes, its damage times GPTQ's share measured on the "
                     "sampled rows under that covariance (in sample: the text GPTQ is fitted to).")
    elif s.get("gptq"):
        lines[0] += (f" Every tensor llama.cpp quantized was rounded again by GPTQ under {Path(s['gptq']).name} "
                     f"(damping {s['gptq_damp']:g}): the same types and bytes as without it. The predicted KLD is that "
                     "of llama.cpp's own rounding.")
    scored = "chunks_scored" in result
    if scored:
        lines[0] += (f" Scored on {result['chunks_scored']} chunks x {s['ctx']} tokens of {Path(s['text']).name}, "
                     f"flash attention {'on' if s['flash_attn'] else 'off'}.")
    speed = s.get("type_speed")
    if speed:
        lines[0] += (f" Generation speed predicted from each type's measured in llama.cpp ({speed['cpu']}, "
                     f"{speed['threads'] or 'default'} threads); each mix was held to {s['match_speed']:g}x its stock "
                     "neighbour's.")
    lines += ["", "| file | budget | MiB | bpw | predicted KLD | KLD mean | ± | KLD p99 | PPL | top-1 |"
              + (" predicted tok/s |" if speed else ""),
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if speed else "")]
    for r in sorted(result["mixes"] + result["stock"], key=lambda r: r["file_bytes"]):
        lines.append(f"| {r['label']} | {r.get('budget', '-')} | {r['file_bytes'] / MiB:.2f} | {r['bpw']:.3f} | "
                     f"{_num(r.get('predicted_kld'))} | {_num(r.get('kld_mean'))} | {_num(r.get('kld_err'))} | "
                     f"{_num(r.get('kld_p99'), 3)} | {_num(r.get('ppl'), 3)} | {_num(r.get('top1_agreement'), 3)} |"
                     + (f" {_num(r.get('predicted_tokens_per_second'), 1)} |" if speed else ""))
    for m in result["mixes"]:
        counts = ", ".join(f"{t} {n}" for t, n in sorted(m["type_counts"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"{m['label']} -> {m['output']} ({m['file_bytes']} bytes, budget {m['budget_bytes']}): {counts}."
                  f" Recipe: {m['recipe']}."]
        if m.get("theta_offered"):
            lines.append(f"Theta was offered to every block matrix and taken by {m['theta_matrices']}"
                         + (f" ({m['theta_bytes']} bytes in {m['theta_output']}; llama.cpp applies it as a LoRA "
                            "adapter, which costs generation speed: measure with nkat bench)." if m["theta_matrices"]
                            else ": no rank removed more predicted damage per byte than a type change."))
        target = m.get("speed_target")
        if target:
            lines.append(f"Held to {target['ratio']:g}x the predicted generation speed of {target['stock']}"
                         + (": met." if target["met"] else ": not reachable at this budget; the fastest allocation "
                            "found was written."))
        if m.get("gptq_priced"):
            lines.append(f"GPTQ rounding was chosen for {m['gptq_matrices']} tensors.")
        search = m.get("refine")
        if search:
            moved = ", ".join(f"{g} x{2.0 ** v:g}" for g, v in search["offsets"].items()) or "none"
            lines.append(f"Refined by {search['trials']} Optuna trials scored on {search['chunks']} calibration "
                         f"chunks: KLD there {search['kld_before']:.5f} unrefined, {search['kld_after']:.5f} "
                         f"± {search['kld_err_after']:.5f} chosen (trial {search['best_trial']}; weights moved: {moved}).")
        near = m.get("nearest_stock")
        if near and near.get("kld_mean") is not None and m.get("kld_mean") is not None:
            lines.append(f"Nearest stock type in size: {near['label']} ({near['file_bytes'] / MiB:.2f} MiB), KLD "
                         f"{near['kld_mean']:.4f} vs the mix's {m['kld_mean']:.4f}.")
    f = result.get("fit")
    if f:
        roles = ", ".join(f"{r} {w:.3g}" for r, w in f["role_weight"].items())
        depth = ", ".join(f"{w:.2f}" for w in f["depth_weight"])
        ratios = [r for r in f["held_out_ratio"] if r == r]  # one per held-out probe measured (--fit-check)
        check = (f"On {len(ratios)} held-out role x quarter probes: Spearman {_num(f['spearman_held_out'], 3)}, "
                 f"predicted / measured {min(ratios, default=0):.2f}-{max(ratios, default=0):.2f}."
                 if f["held_out_ratio"] else "Not checked on held-out probes (--fit-check does).")
        lines += ["", f"KLD per unit of relative damage, fitted on {sum(not p['held_out'] for p in f['probes'])} "
                  f"probe files scored on the calibration text: by role {roles}; by depth quarter x [{depth}]. "
                  + check]
        if f.get("tensor_weight"):
            own = ", ".join(f"{n.removesuffix('.weight')} {w:.3g}" for n, w in f["tensor_weight"].items())
            lines.append(f"Probed alone (relative error under-rates them: a few huge activations dominate their "
                         f"output): {own}.")
    p = result.get("prediction")
    if p:
        how = (f"{_num(p['kld_per_damage'])} x summed relative damage, one scale fitted on these {p['files']} files"
               if p["kld_per_damage"] is not None else "from the probe fit above")
        lines += ["", f"Predicted KLD: {how}; Spearman rank correlation of predicted and measured over the "
                  f"{p['files']} scored files: {_num(p['spearman_predicted_vs_measured'], 3)}."]
    return "\n".join(lines) + "\n"
