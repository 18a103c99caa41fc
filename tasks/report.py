"""The evaluation report: a metrics table per system, figures in the manner of the seed's, markdown."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

FIGURE_PANELS = [
    ("accuracy", "Accuracy (%)", 100.0, True),
    ("wall_s", "Wall time (s)", 1.0, False),
    ("gpu_util_avg", "GPU util avg (%)", 1.0, False),
    ("gpu_power_avg_w", "GPU power avg (W)", 1.0, False),
    ("energy_per_correct_mwh", "Energy / correct (mWh)", 1.0, False),
    ("cpu_mem_avg_gb", "CPU memory avg (GB)", 1.0, False),
]
SYSTEM_LABELS = {
    "edge_only": "Edge only (YOLO11-cls)",
    "cloud_only": "Cloud only (tuned VLM)",
    "qwen_zeroshot": "Qwen2.5-VL zero-shot",
    "llava_zeroshot": "LLaVA-1.5 zero-shot",
    "saec": "SAEC",
}
SHOWN = ["system", "accuracy", "balanced_accuracy", "acc_good", "acc_defect", "auroc", "cloud_share", "wall_s",
         "serial_s", "gpu_util_avg", "gpu_power_avg_w", "energy_per_correct_mwh", "energy_sources", "cpu_mem_avg_gb"]  # fmt: skip


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if pct else f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def plot_systems(metrics: pd.DataFrame, path: Path, title: str) -> Path:
    """One bar chart per measure, one bar per system; a measure nobody could take says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    names = [SYSTEM_LABELS.get(s, s) for s in metrics.system]
    colours = ["#d62728" if s == "saec" else "#7f7f7f" for s in metrics.system]
    for ax, (col, label, scale, higher_better) in zip(axes.flat, FIGURE_PANELS):
        values = pd.to_numeric(metrics.get(col), errors="coerce") * scale
        ax.set_title(label + ("  (higher is better)" if higher_better else "  (lower is better)"), fontsize=10)
        if values.isna().all():
            ax.text(0.5, 0.5, "not measurable on this machine", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        bars = ax.bar(range(len(names)), values.fillna(0.0), color=colours)
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if pd.isna(v) else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_summary(metrics: pd.DataFrame, title: str, notes: list[str]) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(SHOWN) + " |", "|" + "---|" * len(SHOWN)]
    pct = {"accuracy", "balanced_accuracy", "acc_good", "acc_defect", "cloud_share"}
    for row in metrics.to_dict("records"):
        cells = [SYSTEM_LABELS.get(row["system"], row["system"]) if c == "system" else _fmt(row.get(c), c in pct) for c in SHOWN]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracy, shares and per-class accuracies in %. Wall time measured; serial_s is the sum of the "
              "measured stage times of the same run.", ""]  # fmt: skip
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
