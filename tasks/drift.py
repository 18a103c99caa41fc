"""Drift between two evaluations of the same systems: plain functions over their metric rows.

A re-evaluation compares each system's metrics with the previous run of the same
deployment and flags what moved beyond a tolerance:

    accuracy, balanced_accuracy   "drop":     previous - current > tolerance   (absolute)
    cloud_share                   "shift":    |current - previous| > tolerance (absolute)
    s_per_image                   "increase": (current - previous) / previous > tolerance
    energy_per_correct_mwh        "increase": the same, relative

`s_per_image` is the measured wall time over the number of images, so sets of different
sizes compare. Time and energy compare only between two complete measurements (a run whose
SAEC stages came partly from the cache measured only part of the work). A metric that one
of the runs did not measure (no energy counter on the machine, say) is reported with a note
and never flagged.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from saec.artifacts.schemas import empty_table

DRIFT_COLUMNS = ["dataset", "system", "metric", "rule", "previous", "current", "change", "tolerance", "drifted", "note"]


class DriftConfig(BaseModel):
    """Tolerances of a re-evaluation: how far a metric may move before it is flagged as drift."""

    model_config = ConfigDict(extra="forbid")
    max_accuracy_drop: float = Field(0.02, ge=0, le=1, description="accuracy and balanced accuracy, absolute")
    max_cloud_share_shift: float = Field(0.10, ge=0, le=1, description="share of images sent to the cloud, absolute")
    max_latency_increase: float = Field(0.25, ge=0, description="wall seconds per image, relative")
    max_energy_increase: float = Field(0.25, ge=0, description="energy per correct decision, relative")
    systems: list[str] | None = Field(None, description="systems to check; None: every system of the current run")
    fail_on_drift: bool = Field(False, description="fail the flow run when drift is found (after publishing it)")

    def checks(self) -> list[tuple[str, str, float]]:
        """(metric, rule, tolerance) for every check."""
        return [
            ("accuracy", "drop", self.max_accuracy_drop),
            ("balanced_accuracy", "drop", self.max_accuracy_drop),
            ("cloud_share", "shift", self.max_cloud_share_shift),
            ("s_per_image", "increase", self.max_latency_increase),
            ("energy_per_correct_mwh", "increase", self.max_energy_increase),
        ]


_EPS = 1e-12


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def metric_values(row: dict[str, Any]) -> dict[str, float | None]:
    """The compared metrics of one system's report row (`s_per_image` derived from wall time and n)."""
    wall, n = _number(row.get("wall_s")), _number(row.get("n"))
    return {
        "accuracy": _number(row.get("accuracy")),
        "balanced_accuracy": _number(row.get("balanced_accuracy")),
        "cloud_share": _number(row.get("cloud_share")),
        "s_per_image": wall / n if wall is not None and n else None,
        "energy_per_correct_mwh": _number(row.get("energy_per_correct_mwh")),
    }


# What a report row's `measured` says when its time and energy cover the whole system: SAEC's
# measurement taken while all its stages executed (or that measurement, reported again from
# the store), a baseline measured inside its own stage. "not measured: ..." holds no time.
COMPLETE_MEASUREMENTS = frozenset({"executed", "inside its stage"})


def _complete(measured: Any) -> bool:
    return measured is None or measured in COMPLETE_MEASUREMENTS


def _judge(rule: str, previous: float | None, current: float | None, tol: float) -> tuple[float | None, bool, str]:
    if previous is None or current is None:
        missing = "previous" if previous is None else "current"
        return None, False, f"not measured in the {missing} run"
    if rule == "drop":
        change = current - previous
        return change, -change > tol + _EPS, ""
    if rule == "shift":
        change = current - previous
        return change, abs(change) > tol + _EPS, ""
    if previous <= 0:
        return None, False, "previous value is zero: no relative change"
    change = (current - previous) / previous
    return change, change > tol + _EPS, ""


def compare_metrics(
    previous: Iterable[dict[str, Any]] | None, current: Iterable[dict[str, Any]], cfg: DriftConfig, dataset: str
) -> pd.DataFrame:
    """One row per (system, metric): both values, the change, the tolerance and whether it drifted.

    `previous` and `current` are a report's per-system rows (`report.info["systems"]`);
    `previous=None` means there is no earlier run: every row is a baseline, none drifted.
    """
    cur = {r["system"]: r for r in current}
    prev = {r["system"]: r for r in previous} if previous is not None else None
    systems = list(cur) if cfg.systems is None else [s for s in cfg.systems]
    missing = [s for s in systems if s not in cur]
    if missing:
        raise ValueError(f"drift.systems names {missing}, which the current run did not evaluate (it has {list(cur)})")
    rows = []
    for system in systems:
        now = metric_values(cur[system])
        before = metric_values(prev[system]) if prev is not None and system in prev else None
        for metric, rule, tol in cfg.checks():
            base = {"dataset": dataset, "system": system, "metric": metric, "rule": rule, "tolerance": tol,
                    "current": now[metric]}  # fmt: skip
            if before is None:
                note = "no previous run: this run is the baseline" if prev is None else "system not in the previous run"
                rows.append(base | {"previous": None, "change": None, "drifted": False, "note": note})
                continue
            change, drifted, note = _judge(rule, before[metric], now[metric], tol)
            if rule == "increase":  # costs compare only between two complete measurements
                a, b = prev[system].get("measured"), cur[system].get("measured")
                if not (_complete(a) and _complete(b)):
                    drifted, note = False, f"not comparable: measured {a!r} before, {b!r} now"
            rows.append(base | {"previous": before[metric], "change": change, "drifted": drifted, "note": note})
    if not rows:
        return empty_table("drift")
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS).astype({"drifted": bool})


def drift_findings(table: pd.DataFrame) -> list[str]:
    """One sentence per flagged row."""
    out = []
    for r in table[table.drifted].itertuples():
        if r.rule == "drop":
            out.append(f"{r.system}: {r.metric} dropped {-r.change * 100:.1f} points "
                       f"({r.previous:.3f} -> {r.current:.3f}; tolerance {r.tolerance * 100:.1f})")  # fmt: skip
        elif r.rule == "shift":
            out.append(f"{r.system}: {r.metric} moved {r.change * 100:+.1f} points "
                       f"({r.previous:.3f} -> {r.current:.3f}; tolerance {r.tolerance * 100:.1f})")  # fmt: skip
        else:
            out.append(f"{r.system}: {r.metric} rose {r.change * 100:.0f}% "
                       f"({r.previous:.4g} -> {r.current:.4g}; tolerance {r.tolerance * 100:.0f}%)")  # fmt: skip
    return out


def _cell(v: Any, rule: str | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "**DRIFT**" if v else "ok"
    if isinstance(v, float):
        return f"{v:+.1%}" if rule == "increase" else f"{v:.4g}"
    return str(v)


def drift_markdown(table: pd.DataFrame, dataset: str, previous_run: str | None, current_run: str) -> str:
    """The drift report of one evaluation set, for a Prefect markdown artifact."""
    findings = drift_findings(table)
    lines = [f"# Drift on {dataset}", ""]
    lines.append(f"Run `{current_run}` compared with " + (f"`{previous_run}`." if previous_run else "no earlier run (baseline)."))
    lines.append("")
    if findings:
        lines += [f"**Drift beyond tolerance in {len(findings)} check(s):**", ""] + [f"- {f}" for f in findings]
    else:
        lines.append("No metric moved beyond its tolerance.")
    lines += ["", "| system | metric | rule | previous | current | change | tolerance | verdict | note |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in table.itertuples():
        change = _cell(r.change, r.rule)
        if r.rule != "increase" and change:
            change = f"{r.change:+.4g}"
        tol = f"{r.tolerance:.0%}" if r.rule == "increase" else f"{r.tolerance:.4g}"
        lines.append(f"| {r.system} | {r.metric} | {r.rule} | {_cell(r.previous)} | {_cell(r.current)} | {change} | "
                     f"{tol} | {_cell(bool(r.drifted))} | {_cell(r.note)} |")  # fmt: skip
    return "\n".join(lines) + "\n"
