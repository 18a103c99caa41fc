"""Prefect tasks of the evaluation: complexity, routing, merge, metrics and report.

The model stages (edge and cloud) live in their own sub-packages; these tasks only
read and write tables.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from saec.artifacts.store import StageResult, write_json_atomic, write_table
from saec.tasks.complexity import ComplexityConfig, complexity_scores
from saec.tasks.metrics import classification_metrics
from saec.tasks.report import breakdown, plot_breakdown, markdown_summary, plot_systems
from saec.tasks.routing import RoutingConfig, complexity_quota, decisions_frame, merge_decisions, route_images
from saec.tasks.stage import Built, stage
from saec.tasks.telemetry import TelemetryConfig, energy_per_correct_mwh, measure

# The keep rule's fields; the quota ratio and the cloud threshold are applied by other stages.
RULE_FIELDS = {"smax_thr", "margin_thr", "ent_thr", "keep_bidir", "bidir_margin_min"}


@stage("complexity", task="complexity", observe=("telemetry",))
def complexity_task(out: Path, images: StageResult, table: str, cfg: ComplexityConfig, telemetry: TelemetryConfig) -> Built:
    """The published run's scene-complexity score of every image, measured."""
    frame, summary, samples = measure(lambda: complexity_scores(images.table(table), cfg), telemetry)
    ref = write_table(frame, "complexity", out / "complexity.parquet")
    write_table(samples, "telemetry", out / "telemetry.parquet")
    files = {"complexity": Path(ref.path), "telemetry": out / "telemetry.parquet"}
    return files, {"images": ref.rows, "seconds": summary["wall_s"], "telemetry": summary}


@stage("quota", task="route-by-complexity")
def quota_task(out: Path, images: StageResult, table: str, complexity: StageResult, ratio: float) -> Built:
    """Split the images: the most complex share to the cloud at once, the rest to the edge."""
    manifest = images.table(table)
    ranked = complexity_quota(complexity.table("complexity"), ratio)
    cloud_ids = set(ranked.image_id[ranked.to_cloud])
    files = {
        "ranked": out / "ranked.parquet",
        "cloud_manifest": Path(write_table(manifest[manifest.image_id.isin(cloud_ids)], "manifest", out / "cloud_manifest.parquet").path),
        "edge_manifest": Path(write_table(manifest[~manifest.image_id.isin(cloud_ids)], "manifest", out / "edge_manifest.parquet").path),
    }  # fmt: skip
    ranked.to_parquet(files["ranked"], index=False)
    return files, {"to_cloud": len(cloud_ids), "to_edge": int(len(manifest) - len(cloud_ids)), "ratio": ratio}


@stage("routing", task="route-by-confidence")
def route_task(out: Path, images: StageResult, table: str, quota: StageResult, edge: StageResult, rule: dict) -> Built:
    """The routing table (branch and reason per image) and the manifest of images the edge was unsure of."""
    cfg = RoutingConfig(**rule)
    manifest = images.table(table)
    routing = route_images(pd.read_parquet(quota.path("ranked")), edge.table("predictions"), cfg, manifest)
    uncertain = set(routing.image_id[routing.reason == "edge_uncertain"])
    files = {
        "routing": Path(write_table(routing, "routing", out / "routing.parquet").path),
        "cloud_manifest": Path(write_table(manifest[manifest.image_id.isin(uncertain)], "manifest", out / "cloud_manifest.parquet").path),
    }  # fmt: skip
    return files, {"reasons": {k: int(v) for k, v in routing.reason.value_counts().items()}}


def _concat_scores(*stages: StageResult) -> pd.DataFrame:
    return pd.concat([s.table("scores") for s in stages], ignore_index=True)


@stage("merge", task="merge-decisions")
def merge_task(
    out: Path, images: StageResult, table: str, routing: StageResult, edge: StageResult,
    cloud_first: StageResult, cloud_second: StageResult, cloud_thr: float,
) -> Built:  # fmt: skip
    """SAEC's decision per image: the edge verdict where it stood, the cloud's elsewhere."""
    cfg = RoutingConfig(cloud_thr=cloud_thr)
    cloud = _concat_scores(cloud_first, cloud_second)
    d = merge_decisions(images.table(table), routing.table("routing"), edge.table("predictions"), cloud, cfg)
    ref = write_table(d, "decisions", out / "decisions.parquet")
    return {"decisions": Path(ref.path)}, {"correct": int(d.correct.sum()), "n": len(d)}


def baseline_decisions(labels: pd.DataFrame, predictions: pd.DataFrame, system: str, cloud_thr: float | None) -> pd.DataFrame:
    """Decisions of a single-model system: the edge verdict, or P(defect) >= cloud_thr."""
    p = predictions.set_index("image_id").reindex(labels.image_id)
    if p.p_defect.isna().all() and "verdict" not in p:
        raise ValueError(f"{system}: no predictions for the evaluation images")
    if cloud_thr is None:  # edge
        pred, branch = p.verdict.to_numpy(), "edge"
    else:
        pred, branch = (p.p_defect.to_numpy() >= cloud_thr), "cloud"
    reason = "edge_only" if cloud_thr is None else "cloud_only"
    return decisions_frame(labels, pred, p.p_defect.to_numpy(dtype=float), system, branch, reason)


def system_row(system: str, decisions: pd.DataFrame, measurement: dict) -> dict:
    m = classification_metrics(decisions)
    tel = measurement.get("telemetry", {})
    row = {"system": system, **m, "wall_s": measurement.get("wall_s"), "serial_s": measurement.get("serial_s"),
           "measured": measurement.get("measured", "executed")}  # fmt: skip
    # memory: what the system added at its peak; the process's own size (the same whatever runs in it)
    # compares nothing between systems, so the per-system metrics leave it out (the stage telemetry keeps it)
    for k in ("gpu_util_avg", "gpu_power_avg_w", "cpu_mem_added_gb", "cpu_percent_avg", "energy_wh", "energy_sources"):
        row[k] = tel.get(k)
    row["energy_per_correct_mwh"] = energy_per_correct_mwh(tel.get("energy_wh"), m["correct"])
    return row


METRIC_COLS = ["dataset", "system", "n", "n_good", "n_defect", "correct", "accuracy", "balanced_accuracy", "acc_good",
               "acc_defect", "auroc", "cloud_share", "tn", "fp", "fn", "tp", "wall_s", "serial_s", "measured", "gpu_util_avg", "gpu_power_avg_w",
               "energy_wh", "energy_per_correct_mwh", "energy_sources", "cpu_mem_added_gb", "cpu_percent_avg"]  # fmt: skip


def write_report(out: Path, dataset: str, rows: list[dict], decisions: list[pd.DataFrame], notes: list[str],
                 header: list[str] | None = None, labels: dict[str, str] | None = None):
    metrics = pd.DataFrame(rows).assign(dataset=dataset).reindex(columns=METRIC_COLS)
    metrics.to_parquet(out / "metrics.parquet", index=False)
    every = pd.concat(decisions, ignore_index=True)
    every.pipe(write_table, "decisions", out / "decisions.parquet")
    groups = breakdown(every).assign(dataset=dataset)
    groups.to_parquet(out / "breakdown.parquet", index=False)
    title = f"SAEC evaluation: {dataset}"
    plot_systems(metrics, out / "systems.png", title, labels)
    plot_breakdown(groups, out / "breakdown.png", f"{title}: accuracy by category and defect type", labels or {})
    (out / "report.md").write_text(markdown_summary(metrics, title, notes, header, groups, labels))
    write_json_atomic(out / "metrics.json", metrics.replace({np.nan: None}).to_dict("records"))
    files = {k: out / f for k, f in (("metrics", "metrics.parquet"), ("decisions", "decisions.parquet"),
                                    ("breakdown", "breakdown.parquet"), ("figure", "systems.png"),
                                    ("breakdown_figure", "breakdown.png"), ("markdown", "report.md"),
                                    ("json", "metrics.json"))}  # fmt: skip
    return files, {"dataset": dataset, "systems": metrics.replace({np.nan: None}).to_dict("records"), "notes": notes,
                   "header": header or [], "labels": labels or {}}


@stage("report", task="report")
def report_task(
    out: Path, dataset: str, images: StageResult, outputs: dict[str, StageResult], measurements: dict[str, dict],
    cloud_thr: float, notes: list[str], labels: dict[str, str] | None = None, shortfall: str | None = None,
) -> Built:  # fmt: skip
    """Metrics per system, per category and per defect type, the figures, the markdown summary.

    `labels` names systems in the tables and figures where the defaults would mislead (the
    embedded stand-ins for the zero-shot models).
    """
    manifest = images.table("manifest")
    n_good, n_defect = int((manifest.label == 0).sum()), int((manifest.label == 1).sum())
    header = [f"Evaluation set: {len(manifest)} images, {n_good} good and {n_defect} defect."]
    if shortfall:  # a parameter, not read from `images`: two requests can give the same set
        header.append(f"**Warning:** {shortfall}.")
    rows, decisions, all_notes = [], [], list(notes)
    for system, res in outputs.items():
        if system == "saec":
            d = res.table("decisions")
            m = measurements[system]
            wall = "n/a" if m.get("wall_s") is None else f"{m['wall_s']:.2f} s"
            all_notes.append(f"SAEC wall time {wall} ({m.get('measured')}, run {m.get('run_id', '?')}); "
                             f"serial sum of its stages {m['serial_s']:.2f} s")  # fmt: skip
        else:
            table = res.table("predictions" if system == "edge_only" else "scores")
            d = baseline_decisions(manifest, table, system, None if system == "edge_only" else cloud_thr)
        rows.append(system_row(system, d, measurements[system]))
        decisions.append(d)
    sources = "; ".join(f"{r['system']}: {r['energy_sources']}" for r in rows)
    none = any(r["energy_sources"] == "none" for r in rows)
    all_notes.append("energy counted from: " + sources + (" (none: no energy counter is readable on this machine)"
                                                           if none else ""))
    return write_report(out, dataset, rows, decisions, all_notes, header, labels)
