"""PNG plots for profile and peer-benchmark reports (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path

STAGE_COLORS = {"text_encode": "#8c564b", "vae_encode": "#1f77b4", "pack_rope": "#7f7f7f", "dit": "#d62728",
                "scheduler": "#bcbd22", "vae_decode": "#2ca02c", "other host": "#17becf"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def profile_plots(report: dict, out: Path) -> list[str]:
    """latency_vs_tokens.png (p50 total and DiT step vs image tokens, one line per backend) and
    stage_breakdown.png (stacked p50 stage seconds per configuration). Returns the file names."""
    plt = _plt()
    rows = report["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        rs = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["image_tokens"])
        x = [r["image_tokens"] for r in rs]
        ax1.errorbar(x, [r["stages"]["total"]["p50"] for r in rs],
                     yerr=[[0] * len(rs), [r["stages"]["total"]["p90"] - r["stages"]["total"]["p50"] for r in rs]],
                     marker="o", capsize=3, label=backend)
        ax2.plot(x, [r["dit_step"]["p50"] * 1e3 for r in rs], marker="o", label=backend)
        for r in rs:
            ax1.annotate(f"B{r['budget']} {r['refs']}ref", (r["image_tokens"], r["stages"]["total"]["p50"]),
                         textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax1.set(xlabel="image tokens (target + references)", ylabel="end-to-end s (p50, bar to p90)",
            title=f"Edit latency, {report['options']['steps']} steps")
    ax2.set(xlabel="image tokens (target + references)", ylabel="ms (p50)", title="One DiT step")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_tokens.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 3), 4.5))
    labels = [f"{r['backend']}\nB{r['budget']} {r['refs']}ref\n{r['image_tokens']} tok" for r in rows]
    bottom = [0.0] * len(rows)
    parts = ["text_encode", "vae_encode", "pack_rope", "dit", "scheduler", "vae_decode"]
    for stage in parts + ["other host"]:
        if stage == "other host":
            vals = [max(0.0, r["stages"]["total"]["p50"] - sum(r["stages"][s]["p50"] for s in parts)) for r in rows]
        else:
            vals = [r["stages"][stage]["p50"] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=stage, color=STAGE_COLORS[stage])
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"host {r['host_overhead_pct']['p50']:.2f}%", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="seconds (p50 per stage)", title="Stage breakdown per configuration")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out / "stage_breakdown.png", dpi=110)
    plt.close(fig)
    return ["latency_vs_tokens.png", "stage_breakdown.png"]


def bar_chart(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> str:
    """A labelled bar chart (peer benchmark)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(labels, values, color=["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"][: len(values)])
    for b, v in zip(bars, values, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom")
    ax.set(ylabel=ylabel, title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
