"""Outputs of `nkat frontier` and `nkat attribute`: markdown tables and matplotlib plots."""

from __future__ import annotations

from pathlib import Path

from ..util.atomic import atomic_path, write_text_atomic

GIB = 1024 ** 3
MIB = 1024 ** 2
_MARK = {"ladder": ("o", "tab:blue"), "reference": ("*", "black"), "mix": ("^", "tab:green"),
         "control": ("s", "tab:orange"), "theta": ("D", "tab:red")}


def _num(value, digits=4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def frontier_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Quality per byte against {Path(s['reference']).name}: {s['chunks_scored']} chunks x {s['ctx']} tokens of "
        f"{Path(s['text']).name}, flash attention {'on' if s['flash_attn'] else 'off'}, backend {s['backend']}, "
        f"theta source {s['source']}. Frontier = no other model is smaller and better.",
        "",
        "| model | kind | MiB | PPL | ± | KLD mean | ± | KLD p99 | top-1 | frontier (KLD / PPL) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        front = f"{'yes' if r['pareto_kld'] else 'no'} / {'yes' if r['pareto_ppl'] else 'no'}"
        lines.append(f"| {r['label']} | {r['kind']} | {r['bytes'] / MIB:.1f} | {_num(r['ppl'], 3)} | "
                     f"{_num(r['ppl_err'], 3)} | {_num(r.get('kld_mean'))} | {_num(r.get('kld_err'))} | "
                     f"{_num(r.get('kld_p99'), 3)} | {_num(r.get('top1_agreement'), 3)} | {front} |")
    lines += ["", "Verdicts (byte-matched control: the best plain model at <= "
              f"{100 * (1 + s['byte_tolerance']):.0f} % of the theta point's bytes, judged on KLD):", ""]
    lines += [f"- {v}" for v in result["verdicts"]]
    if result.get("goals"):
        lines += ["", "Base + theta at <= the bytes of the next rung:", ""]
        for g in result["goals"]:
            lines.append(f"- {g['point']} ({g['bytes'] / MIB:.1f} MiB) vs {g['rung']} ({g['rung_bytes'] / MIB:.1f} MiB): "
                         f"PPL {g['ppl']:.3f} ± {g['ppl_err']:.3f} vs {g['rung_ppl']:.3f} ± {g['rung_ppl_err']:.3f} "
                         f"({'better' if g['beats_on_ppl'] else 'WORSE'}), KLD {g['kld_mean']:.4f} vs "
                         f"{g['rung_kld_mean']:.4f} ({'better' if g['beats_on_kld'] else 'WORSE'})")
    lines += ["", f"Wall time {result['wall_seconds']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return str(path)


def frontier_plot(result: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric, err, title in ((axes[0], "ppl", "ppl_err", "perplexity"), (axes[1], "kld_mean", "kld_err", "KL-divergence (mean)")):
        flag = "pareto_ppl" if metric == "ppl" else "pareto_kld"
        front = sorted((r for r in rows if r[flag]), key=lambda r: r["bytes"])
        ax.step([r["bytes"] / GIB for r in front], [r[metric] for r in front], where="post", color="gray",
                lw=1, label="Pareto frontier")
        for kind, (marker, color) in _MARK.items():
            pts = [r for r in rows if r["kind"] == kind]
            if pts:
                ax.errorbar([r["bytes"] / GIB for r in pts], [r[metric] for r in pts],
                            yerr=[r.get(err) or 0 for r in pts], fmt=marker, color=color, label=kind, capsize=2)
        for r in rows:
            ax.annotate(r["label"].replace(" (reference)", ""), (r["bytes"] / GIB, r[metric]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("GiB on disk (model + theta)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs bytes")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"{Path(s['reference']).name}: {s['chunks_scored']} chunks x {s['ctx']} of {Path(s['text']).name}",
                 fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out


def attribution_markdown(result: dict) -> str:
    s = result["settings"]
    base = result["base"]
    lines = [
        f"Where {Path(s['base']).name} lost quality against {Path(s['reference']).name}: each group of tensors "
        f"restored alone from the reference; {s['chunks_scored']} chunks x {s['ctx']} of {Path(s['text']).name}. "
        f"Base KLD {base['kld_mean']:.4f}, PPL {base['ppl']:.3f}.",
        "",
        "| group | tensors | extra MiB | KLD | share of base KLD removed | per 10 MiB | PPL | ± |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["groups"]:
        per = 100 * r["share"] / (r["extra_bytes"] / (10 * MIB)) if r["extra_bytes"] > 0 else float("nan")
        lines.append(f"| {r['group']} | {r['tensors']} | {r['extra_bytes'] / MIB:.1f} | {r['kld_mean']:.4f} | "
                     f"{100 * r['share']:.1f} % | {per:.2f} % | {r['ppl']:.3f} | {r['ppl_err']:.3f} |")
    same = [r["group"] for r in result["groups"] if r["tensors_differing"] == 0]
    if same:
        lines += ["", f"Stored byte for byte as in the reference (nothing to restore, not scored): {', '.join(same)}."]
    lines += ["", f"Wall time {result['wall_seconds']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def attribution_plot(result: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result["groups"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = range(len(groups))
    ax.bar(x, [100 * g["share"] for g in groups], color="tab:blue")
    for i, g in enumerate(groups):
        ax.annotate(f"+{g['extra_bytes'] / MIB:.0f} MiB", (i, 100 * g["share"]), ha="center", fontsize=7,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(list(x), [g["group"] for g in groups], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("% of the base's KLD removed")
    ax.set_title(f"restoring one tensor group from {Path(result['settings']['reference']).name}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_outputs(result: dict, out_dir: Path, stem: str, markdown, plot) -> dict:
    from ..util.report import to_json

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out_dir / f"{stem}.json"), "markdown": str(out_dir / f"{stem}.md")}
    write_text_atomic(paths["markdown"], markdown(result))
    paths["png"] = plot(result, out_dir / f"{stem}.png")
    result["outputs"] = paths
    write_text_atomic(paths["json"], to_json(result))
    return paths
