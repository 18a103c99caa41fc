"""The evaluation report: a metrics table per system, figures in the manner of the published run's, markdown."""
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
    ("cpu_mem_added_gb", "CPU memory added, peak (GB)", 1.0, False),
]
SYSTEM_LABELS = {
    "edge_only": "Edge only (YOLO11-cls)",
    "cloud_only": "Cloud only (tuned VLM)",
    "qwen_zeroshot": "Qwen2.5-VL zero-shot",
    "llava_zeroshot": "LLaVA-1.5 zero-shot",
    "saec": "SAEC",
}
# The report's two tables (each narrow enough for a browser pane): column, heading with its unit.
# Results start with the images of each class every system was measured on.
RESULTS = {"n_good": "good n", "n_defect": "defect n", "accuracy": "accuracy %", "balanced_accuracy": "balanced %",
           "acc_good": "good %", "acc_defect": "defect %", "auroc": "AUROC", "cloud_share": "cloud share %"}
RESOURCES = {"wall_s": "wall s", "serial_s": "serial s", "gpu_util_avg": "GPU util %", "gpu_power_avg_w": "GPU W",
             "energy_per_correct_mwh": "energy / correct mWh", "energy_sources": "energy from",
             "cpu_mem_added_gb": "CPU mem added GB"}
PERCENT = {"accuracy", "balanced_accuracy", "acc_good", "acc_defect", "cloud_share"}  # fractions shown in %


def system_name(system: str, labels: dict[str, str] | None = None) -> str:
    """How tables and figures name a system: the run's label for it, else the usual one."""
    return (labels or {}).get(system, SYSTEM_LABELS.get(system, system))


def display_value(v, pct: bool = False) -> str:
    """A value as every report view shows it: % to one decimal, n/a where missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def display_rows(systems: list[dict], columns, labels: dict[str, str] | None = None) -> list[dict]:
    """Systems' metrics (rows of a report's metrics table) as every view shows them: the report's
    system names, its headings with their units, and `display_value`'s rounding."""
    heads = {**RESULTS, **RESOURCES}
    return [{"system": system_name(r["system"], labels)}
            | {heads[c]: display_value(r.get(c), c in PERCENT) for c in columns} for r in systems]


def plot_systems(metrics: pd.DataFrame, path: Path, title: str, labels: dict[str, str] | None = None) -> Path:
    """One bar chart per measure, one bar per system; a measure nobody could take says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    names = [system_name(s, labels) for s in metrics.system]
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


def breakdown(decisions: pd.DataFrame) -> pd.DataFrame:
    """Accuracy of every system per category and per defect type ("good" for good images): one row
    per (system, by, group) with its image counts."""
    rows = []
    for by in ("category", "defect_type"):
        if decisions[by].isna().all():
            continue
        for (system, group), part in decisions.groupby(["system", by], sort=True):
            rows.append({"system": system, "by": by, "group": str(group), "n": len(part),
                         "n_good": int((part.label == 0).sum()), "n_defect": int((part.label == 1).sum()),
                         "correct": int(part.correct.sum()), "accuracy": float(part.correct.mean())})
    return pd.DataFrame(rows, columns=["system", "by", "group", "n", "n_good", "n_defect", "correct", "accuracy"])


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: its heading row, the rule, one line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _breakdown_markdown(table: pd.DataFrame, systems: list[str], labels: dict[str, str]) -> list[str]:
    lines = []
    for by, heading in (("category", "Accuracy by category (%)"), ("defect_type", "Accuracy by defect type (%)")):
        part = table[table.by == by]
        if part.empty:
            continue
        acc = part.pivot(index="group", columns="system", values="accuracy").reindex(columns=systems)
        counts = part.drop_duplicates("group").set_index("group")[["n", "n_good", "n_defect"]]
        head = [by, "images (good / defect)"] + [system_name(s, labels) for s in systems]
        cells = [[str(group), f"{counts.loc[group].n} ({counts.loc[group].n_good} / {counts.loc[group].n_defect})"]
                 + [display_value(v, pct=True) for v in row] for group, row in acc.iterrows()]
        lines += [f"## {heading}", "", *markdown_table(head, cells), ""]
    return lines


def plot_breakdown(table: pd.DataFrame, path: Path, title: str, labels: dict[str, str]) -> Path:
    """Grouped bars: accuracy per category (left) and per defect type (right), one colour per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = [by for by in ("category", "defect_type") if (table.by == by).any()]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(8 + 6 * len(kinds), 5), squeeze=False)
    systems = list(dict.fromkeys(table.system))
    for ax, by in zip(axes.flat, kinds):
        acc = table[table.by == by].pivot(index="group", columns="system", values="accuracy").reindex(columns=systems)
        x = np.arange(len(acc))
        width = 0.8 / max(1, len(systems))
        for i, system in enumerate(systems):
            ax.bar(x + i * width, 100 * acc[system].to_numpy(dtype=float), width,
                   label=system_name(system, labels))
        ax.set_xticks(x + 0.4 - width / 2)
        ax.set_xticklabels(acc.index, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"by {by.replace('_', ' ')}")
    axes.flat[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_summary(metrics: pd.DataFrame, title: str, notes: list[str], header: list[str] | None = None,
                     breakdown_table: pd.DataFrame | None = None, labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    lines = [f"# {title}", "", *(header or []), *([""] if header else [])]
    for heading, columns in (("Results", RESULTS), ("Resources", RESOURCES)):
        rows = [list(row.values()) for row in display_rows(metrics.to_dict("records"), columns, labels)]
        lines += [f"## {heading}", "", *markdown_table(["system", *columns.values()], rows), ""]
    lines += ["Wall time measured; serial s is the sum of the measured stage times of the same run; n/a where "
              "the machine offers no such counter.", ""]  # fmt: skip
    lines += [f"- {n}" for n in notes]
    if breakdown_table is not None and len(breakdown_table):
        lines += ["", *_breakdown_markdown(breakdown_table, list(metrics.system), labels)]
    return "\n".join(lines) + "\n"
