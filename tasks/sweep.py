"""Routing sweep: SAEC's decisions over a grid of thresholds, from tables already computed.

Inputs are the per-image tables of one evaluation: complexity, the edge's measures on
every image (the edge-only system) and the cloud's P(defect) on every image (the
cloud-only system). No model runs. Cost per operating point is *estimated* from the
measured per-image cost of each branch (its baseline's wall time, and energy where it
was measured, divided by its image count); the table says so in `cost_basis`.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from saec.tasks.metrics import classification_metrics
from saec.tasks.routing import RoutingConfig, complexity_quota, merge_decisions, route_images

GRID = {
    "init_q_ratio": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
    "smax_thr": [0.5, 0.55, 0.6, 0.7, 0.8, 0.9],
    "margin_thr": [0.03, 0.1, 0.3, 0.6],
    "ent_thr": [0.5, 0.8, 0.95],
    "keep_bidir": [True, False],
    "cloud_thr": [0.26, 0.5],
}
PARAMS = list(GRID)


def sweep(
    labels: pd.DataFrame,
    complexity: pd.DataFrame,
    edge: pd.DataFrame,
    cloud: pd.DataFrame,
    edge_cost: dict,
    cloud_cost: dict,
    grid: dict[str, list] | None = None,
) -> pd.DataFrame:
    """One row per operating point: its thresholds, metrics and estimated cost."""
    grid = grid or GRID
    rows = []
    ranked_by_q = {q: complexity_quota(complexity, q) for q in grid["init_q_ratio"]}
    for i, values in enumerate(itertools.product(*(grid[k] for k in PARAMS))):
        point = dict(zip(PARAMS, values))
        cfg = RoutingConfig(**point)
        routing = route_images(ranked_by_q[point["init_q_ratio"]], edge, cfg)
        d = merge_decisions(labels, routing, edge, cloud, cfg)
        m = classification_metrics(d)
        n_edge = int((routing.reason != "complexity_quota").sum())
        n_cloud = int((routing.branch == "cloud").sum())
        rows.append(
            {
                "point": i,
                **point,
                "accuracy": m["accuracy"],
                "balanced_accuracy": m["balanced_accuracy"],
                "cloud_share": m["cloud_share"],
                "est_seconds": n_edge * edge_cost["s_per_image"] + n_cloud * cloud_cost["s_per_image"],
                "est_energy_wh": _energy(n_edge, edge_cost) + _energy(n_cloud, cloud_cost)
                if edge_cost.get("wh_per_image") is not None and cloud_cost.get("wh_per_image") is not None
                else np.nan,
                "correct": m["correct"],
            }
        )
    out = pd.DataFrame(rows)
    out["pareto"] = pareto_mask(out.accuracy.to_numpy(), out.cloud_share.to_numpy())
    out["cost_basis"] = "estimated from the measured per-image cost of the edge-only and cloud-only runs"
    return out


def _energy(n: int, cost: dict) -> float:
    return n * cost["wh_per_image"]


def pareto_mask(accuracy: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Points no other point beats on both accuracy (higher) and cost (lower)."""
    order = np.lexsort((-accuracy, cost))  # by cost, then best accuracy first
    mask = np.zeros(len(accuracy), dtype=bool)
    best = -np.inf
    for i in order:
        if accuracy[i] > best:
            mask[i] = True
            best = accuracy[i]
    return mask


def plot_sweep(table: pd.DataFrame, path: Path, title: str, chosen: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_energy = table.est_energy_wh.notna().any()
    fig, axes = plt.subplots(1, 2 if has_energy else 1, figsize=(13 if has_energy else 7, 5), squeeze=False)
    panels = [("cloud_share", "share of images sent to the cloud")]
    if has_energy:
        panels.append(("est_energy_wh", "estimated energy (Wh)"))
    for ax, (col, label) in zip(axes[0], panels):
        ax.scatter(table[col], 100 * table.accuracy, s=8, alpha=0.3, color="#7f7f7f", label="operating points")
        front = table[table.pareto].sort_values(col)
        ax.plot(front[col], 100 * front.accuracy, "-o", color="#d62728", ms=4, label="Pareto front")
        if chosen is not None:
            row = table.set_index("point").loc[chosen]
            ax.scatter([row[col]], [100 * row.accuracy], marker="*", s=200, color="black", label=f"point {chosen}")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def operating_point_overrides(sweep_table: pd.DataFrame, point: int) -> list[str]:
    """The `--set routing.*` overrides that reproduce one operating point."""
    rows = sweep_table[sweep_table.point == point]
    if rows.empty:
        raise ValueError(f"no operating point {point} in the sweep table (0..{int(sweep_table.point.max())})")
    row = rows.iloc[0]
    return [f"routing.{k}={str(bool(row[k])).lower() if k == 'keep_bidir' else float(row[k])}" for k in PARAMS]
