"""Drift between re-evaluations: the rules, the table written to Parquet, and which run is 'previous'."""
from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from saec.artifacts.store import Store, read_table, write_table
from saec.tasks.drift import DriftConfig, compare_metrics, drift_findings, drift_markdown


def row(system="saec", acc=0.90, bal=0.88, share=0.30, wall=10.0, n=100, energy=5.0, measured="executed") -> dict:
    return {"system": system, "n": n, "accuracy": acc, "balanced_accuracy": bal, "cloud_share": share,
            "wall_s": wall, "energy_per_correct_mwh": energy, "measured": measured}  # fmt: skip


def by_metric(table: pd.DataFrame, system: str = "saec") -> pd.DataFrame:
    return table[table.system == system].set_index("metric")


def test_first_run_is_a_baseline_with_nothing_flagged():
    t = compare_metrics(None, [row(), row("edge_only", share=0.0)], DriftConfig(), "mvtec_holdout")
    assert len(t) == 2 * 5 and not t.drifted.any()
    assert t.previous.isna().all() and set(t.note) == {"no previous run: this run is the baseline"}
    assert by_metric(t).loc["s_per_image", "current"] == pytest.approx(0.1)


def test_accuracy_drop_beyond_tolerance_is_flagged_and_a_rise_is_not():
    cfg = DriftConfig(max_accuracy_drop=0.02)
    t = by_metric(compare_metrics([row(acc=0.90, bal=0.88)], [row(acc=0.85, bal=0.87)], cfg, "d"))
    assert t.loc["accuracy", "change"] == pytest.approx(-0.05) and t.loc["accuracy", "drifted"]
    assert not t.loc["balanced_accuracy", "drifted"]  # 1 point, within 2
    up = by_metric(compare_metrics([row(acc=0.80)], [row(acc=0.95)], cfg, "d"))
    assert not up.loc["accuracy", "drifted"]
    exact = by_metric(compare_metrics([row(acc=0.90)], [row(acc=0.88)], cfg, "d"))  # exactly at the tolerance
    assert not exact.loc["accuracy", "drifted"]


@pytest.mark.parametrize("before,after,flag", [(0.30, 0.45, True), (0.30, 0.15, True), (0.30, 0.35, False)])
def test_cloud_share_shift_is_flagged_either_way(before, after, flag):
    t = by_metric(compare_metrics([row(share=before)], [row(share=after)], DriftConfig(max_cloud_share_shift=0.1), "d"))
    assert bool(t.loc["cloud_share", "drifted"]) is flag
    assert t.loc["cloud_share", "change"] == pytest.approx(after - before)


def test_latency_is_per_image_and_relative_and_energy_unmeasured_is_noted():
    # 10 s for 100 images before, 30 s for 200 now: 0.10 -> 0.15 s per image, +50 %
    t = by_metric(compare_metrics([row(wall=10, n=100, energy=None)], [row(wall=30, n=200, energy=6.0)], DriftConfig(), "d"))
    assert t.loc["s_per_image", "change"] == pytest.approx(0.5) and t.loc["s_per_image", "drifted"]
    assert not t.loc["energy_per_correct_mwh", "drifted"]
    assert t.loc["energy_per_correct_mwh", "note"] == "not measured in the previous run"
    within = by_metric(compare_metrics([row(wall=10)], [row(wall=12)], DriftConfig(max_latency_increase=0.25), "d"))
    assert not within.loc["s_per_image", "drifted"]
    energy = by_metric(compare_metrics([row(energy=4.0)], [row(energy=6.0)], DriftConfig(), "d"))
    assert energy.loc["energy_per_correct_mwh", "change"] == pytest.approx(0.5) and energy.loc["energy_per_correct_mwh", "drifted"]


def test_costs_of_a_partial_measurement_are_not_compared():
    t = by_metric(compare_metrics([row(wall=1.0)], [row(wall=50.0, measured="partial: only cloud_quota executed in this run")],
                                  DriftConfig(), "d"))  # fmt: skip
    assert not t.loc["s_per_image", "drifted"] and t.loc["s_per_image", "note"].startswith("not comparable")
    assert not t.loc["energy_per_correct_mwh", "drifted"]


def test_systems_filter_and_systems_missing_from_either_run():
    cfg = DriftConfig(systems=["saec", "cloud_only"])
    t = compare_metrics([row("saec")], [row("saec"), row("cloud_only", share=1.0), row("edge_only")], cfg, "d")
    assert set(t.system) == {"saec", "cloud_only"}
    assert set(t[t.system == "cloud_only"].note) == {"system not in the previous run"}
    with pytest.raises(ValueError, match="llava_zeroshot"):
        compare_metrics(None, [row("saec")], DriftConfig(systems=["llava_zeroshot"]), "d")


def test_config_is_validated():
    with pytest.raises(ValidationError):
        DriftConfig(max_accuracy_drop=-0.1)
    with pytest.raises(ValidationError):
        DriftConfig(max_cloud_share_shift=1.5)
    with pytest.raises(ValidationError):
        DriftConfig(max_acuracy_drop=0.1)  # a typo is an error, not a silent default


def test_drift_table_fits_its_schema_and_reads_back(tmp_path):
    t = compare_metrics([row(acc=0.9)], [row(acc=0.8, energy=None)], DriftConfig(), "mvtec_holdout")
    ref = write_table(t, "drift", tmp_path / "drift.parquet")
    back = read_table(ref.path)
    assert ref.rows == 5 and list(back.columns) == list(t.columns)
    assert back.drifted.tolist() == t.drifted.tolist() and back.dtypes["drifted"] == bool
    md = drift_markdown(back, "mvtec_holdout", "run-a", "run-b")
    findings = drift_findings(back)
    assert findings == ["saec: accuracy dropped 10.0 points (0.900 -> 0.800; tolerance 2.0)"]
    assert "run-a" in md and "run-b" in md and "**DRIFT**" in md and findings[0] in md


def test_previous_run_is_the_latest_completed_one_of_the_same_deployment(tmp_path):
    from saec.flows.reevaluate import model_source, previous_run

    store = Store(tmp_path)

    def make(flow, status, deployment=None, started="2026-01-01T00:00:00+00:00"):
        r = store.new_run(flow)
        r.record.update(status=status, started=started, deployment=deployment)
        r.save()
        return r

    a = make("reevaluate", "completed", "saec-evaluate/nightly", "2026-01-01T02:00:00+00:00")
    b = make("reevaluate", "completed", "saec-evaluate/nightly", "2026-01-02T02:00:00+00:00")
    make("reevaluate", "failed", "saec-evaluate/nightly", "2026-01-03T02:00:00+00:00")
    make("reevaluate", "completed", "saec-evaluate/on-demand", "2026-01-03T09:00:00+00:00")
    now = make("reevaluate", "running", "saec-evaluate/nightly", "2026-01-04T02:00:00+00:00")
    assert previous_run(store, "saec-evaluate/nightly", now).run_id == b.run_id
    assert previous_run(store, "saec-evaluate/nightly", b).run_id == a.run_id
    assert previous_run(store, "saec-evaluate/nightly", a) is None
    assert previous_run(store, "local", now) is None

    with pytest.raises(ValueError, match="no completed pipeline run"):
        model_source(store, None)
    old = make("pipeline", "completed")
    old.record["finished"] = "2026-01-01T01:00:00+00:00"
    old.save()
    new = make("pipeline", "completed")
    new.record["finished"] = "2026-01-02T01:00:00+00:00"
    new.save()
    make("pipeline", "failed")
    assert model_source(store, None).run_id == new.run_id
    assert model_source(store, old.run_id).run_id == old.run_id
    with pytest.raises(ValueError, match="must be a completed pipeline run"):
        model_source(store, a.run_id)
