"""Routing rules, merge, metrics and telemetry summaries on hand-checked tables."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from saec.artifacts.store import write_table
from saec.tasks.metrics import auroc, classification_metrics
from saec.tasks.routing import RoutingConfig, complexity_quota, merge_decisions, route_images
from saec.tasks.telemetry import Sampler, TelemetryConfig, energy_per_correct_mwh, summarize

IDS = [f"img{i}" for i in range(10)]


def _complexity():
    return pd.DataFrame({"image_id": IDS, "complexity": [0.9, 0.1, 0.8, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.7]})


def _edge():
    # columns as the edge stage writes them; smax/margin/entropy describe confidence in the verdict
    return pd.DataFrame(
        {
            "image_id": IDS,
            "verdict": [0, 0, 1, 1, 1, 0, 0, 1, 0, 0],
            "smax": [0.9, 0.9, 0.9, 0.95, 0.6, 0.5, 0.99, 0.97, 0.9, 0.9],
            "margin": [0.8, 0.8, 0.8, 0.9, 0.05, 0.0, 0.98, 0.94, 0.8, 0.8],
            "entropy": [0.3, 0.3, 0.3, 0.2, 0.9, 1.0, 0.05, 0.1, 0.3, 0.3],
            "p_defect": [0.1, 0.1, 0.9, 0.95, 0.6, 0.5, 0.01, 0.97, 0.1, 0.1],
        }
    )


def test_quota_takes_the_most_complex_share_with_stable_ties():
    ranked = complexity_quota(_complexity(), 0.3)
    assert list(ranked[ranked.to_cloud].image_id) == ["img0", "img2", "img8"]  # img8 before img9: tie by id
    assert complexity_quota(_complexity(), 0.0).to_cloud.sum() == 0
    assert complexity_quota(_complexity(), 1.0).to_cloud.all()


def test_routing_keeps_confident_verdicts_both_ways_and_says_why():
    ranked = complexity_quota(_complexity(), 0.3)
    table = route_images(ranked, _edge(), RoutingConfig()).set_index("image_id")
    assert table.loc["img0", "reason"] == "complexity_quota" and pd.isna(table.loc["img0", "edge_verdict"])
    assert table.loc["img1", "reason"] == "edge_confident_good"
    assert table.loc["img3", "reason"] == "edge_confident_defect" and table.loc["img3", "branch"] == "edge"
    assert table.loc["img4", "reason"] == "edge_uncertain"  # defect verdict, margin 0.05 < 0.08
    assert table.loc["img5", "reason"] == "edge_uncertain"  # smax 0.5 < 0.55
    assert table.loc["img7", "reason"] == "edge_confident_defect"
    write_table(table.reset_index(), "routing", "/tmp/saec-routing-test.parquet")  # fits its schema, paths null
    manifest = pd.DataFrame({"image_id": IDS, "path": [f"v/{i}" for i in IDS], "source_path": [f"s/{i}" for i in IDS]})
    traced = route_images(ranked, _edge(), RoutingConfig(), manifest).set_index("image_id")
    assert traced.loc["img4", "source_path"] == "s/img4" and traced.drop(columns=["path", "source_path"]).equals(
        table.drop(columns=["path", "source_path"]))
    no_bidir = route_images(ranked, _edge(), RoutingConfig(keep_bidir=False)).set_index("image_id")
    assert no_bidir.loc["img3", "reason"] == "edge_uncertain" and no_bidir.loc["img3", "branch"] == "cloud"
    with pytest.raises(ValueError, match="no edge prediction"):
        route_images(ranked, _edge().iloc[3:], RoutingConfig())


def test_merge_uses_edge_where_kept_and_cloud_threshold_elsewhere():
    ranked = complexity_quota(_complexity(), 0.3)
    routing = route_images(ranked, _edge(), RoutingConfig())
    labels = pd.DataFrame({"image_id": IDS, "label": [1, 0, 1, 1, 1, 0, 0, 1, 0, 1]})
    cloud = pd.DataFrame({"image_id": IDS, "p_defect": [0.3, 0, 0.2, 0, 0.9, 0.1, 0, 0, 0.25, 0.27]})
    d = merge_decisions(labels, routing, _edge(), cloud, RoutingConfig(cloud_thr=0.26)).set_index("image_id")
    assert d.loc["img0", "pred"] == 1  # cloud 0.3 >= 0.26
    assert d.loc["img2", "pred"] == 0  # cloud 0.2, although the edge said defect
    assert d.loc["img3", "pred"] == 1 and d.loc["img3", "branch"] == "edge"
    assert d.loc["img8", "pred"] == 0  # quota image, cloud 0.25 < 0.26
    assert d.loc["img9", "pred"] == 0 and d.loc["img9", "branch"] == "edge"  # confident good edge verdict stands
    m = classification_metrics(d.reset_index())
    assert m["n"] == 10 and m["correct"] == int(d.correct.sum())
    assert m["tp"] + m["fn"] == 6 and m["cloud_share"] == pytest.approx((d.branch == "cloud").mean())
    with pytest.raises(ValueError, match="no cloud score"):
        merge_decisions(labels, routing, _edge(), cloud.iloc[1:], RoutingConfig())


def test_metrics_by_hand():
    d = pd.DataFrame({"label": [0, 0, 0, 1, 1], "pred": [0, 0, 1, 1, 0], "branch": ["edge"] * 4 + ["cloud"],
                      "score": [0.1, 0.2, 0.7, 0.9, 0.4]})  # fmt: skip
    m = classification_metrics(d)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6) and m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert m["auroc"] == pytest.approx(5 / 6)  # pairs (pos, neg) ranked right: 5 of 6
    assert auroc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    assert classification_metrics(d.assign(score=np.nan))["auroc"] is None


def test_telemetry_integrates_what_it_measured():
    samples = pd.DataFrame({"t": [0.0, 1.0, 2.0], "cpu_percent": [100.0] * 3, "rss_bytes": [1e9, 2e9, 3e9],
                            "gpu_util": [50.0, 100.0, 50.0], "gpu_power_w": [100.0, 300.0, 100.0],
                            "gpu_mem_bytes": [0.0] * 3, "cpu_energy_j": [0.0, 1800.0, 3600.0]})  # fmt: skip
    s = summarize(samples, ["psutil", "nvml", "rapl"])
    assert s["gpu_energy_wh"] == pytest.approx(400.0 / 3600.0)  # trapezoids: 200 + 200 J
    assert s["cpu_energy_wh"] == pytest.approx(1.0) and s["energy_sources"] == "gpu,cpu"
    assert s["cpu_mem_avg_gb"] == pytest.approx(2.0) and s["cpu_mem_added_gb"] == pytest.approx(2.0)  # 3 GB peak - 1 at start
    assert energy_per_correct_mwh(s["energy_wh"], 10) == pytest.approx((1.0 + 400 / 3600) * 100)
    only_cpu = summarize(samples, ["psutil"])
    assert only_cpu["energy_wh"] is None and only_cpu["energy_sources"] == "none"

    sampler = Sampler(TelemetryConfig(interval_s=0.05)).start()
    _ = sum(i * i for i in range(300_000))
    live = sampler.stop()
    assert len(live) >= 2 and live.rss_bytes.gt(0).all() and live.t.is_monotonic_increasing


def test_embedded_model_has_its_own_threshold_and_scoring(tmp_path):
    from saec.config import EMBEDDED_CLOUD_THR, load_config

    embedded = load_config(None, [])
    assert embedded.cloud.embedded and embedded.routing.cloud_thr == EMBEDDED_CLOUD_THR == 0.5
    tuned, baseline = embedded.cloud.score_config("m"), embedded.cloud.score_config("m", baseline=True)
    assert tuned.tta == "dihedral" and tuned.tta_categories == embedded.cloud.train_config("m").augment_categories
    assert baseline.tta == "none"  # zero-shot baselines never saw turned images
    assert load_config(None, ["routing.cloud_thr=0.26"]).routing.cloud_thr == 0.26  # a set value wins
    (tmp_path / "config.json").write_text("{}")  # a model folder as the configuration checks it
    (tmp_path / "model.safetensors").write_bytes(b"")
    real = load_config(None, [f"cloud.model={tmp_path}"])
    assert real.routing.cloud_thr == RoutingConfig().cloud_thr == 0.26  # the published run's value for a real model
    assert real.cloud.score_config("m").tta == "none"
    no_turns = load_config(None, ["cloud.train.augment=none"])
    assert no_turns.cloud.score_config("m").tta == "none"


def test_every_metrics_view_gives_class_counts_and_the_reports_system_names(tmp_path):
    import json
    from types import SimpleNamespace

    from saec.config import load_config
    from saec.flows.evaluate import results_rows, system_labels
    from saec.tasks.evaluate import baseline_decisions, system_row, write_report

    manifest = pd.DataFrame({"image_id": IDS, "label": [0] * 4 + [1] * 6, "path": [f"val/{i}.png" for i in IDS],
                             "source_path": [f"/data/{i}.jpg" for i in IDS], "category": "c",
                             "defect_type": ["good"] * 4 + ["scratch"] * 6})  # fmt: skip
    measured = {"wall_s": 1.0, "serial_s": 1.5,
                "telemetry": {"cpu_mem_added_gb": 0.25, "cpu_mem_avg_gb": 3.0, "energy_sources": "none"}}  # fmt: skip
    edge = baseline_decisions(manifest, _edge(), "edge_only", None)
    scores = pd.DataFrame({"image_id": IDS, "p_defect": np.linspace(0.0, 1.0, 10)})
    qwen = baseline_decisions(manifest, scores, "qwen_zeroshot", 0.5)
    rows = [system_row("edge_only", edge, measured), system_row("qwen_zeroshot", qwen, measured)]
    labels = system_labels(load_config(None, []))  # the embedded default: stand-ins named as such
    assert max(map(len, labels.values())) <= 32  # short enough for a results table to fit a browser pane
    files, info = write_report(tmp_path, "set", rows, [edge, qwen], [], labels=labels)

    # one memory figure per system: what it added; the process's own size compares nothing
    metrics = pd.read_parquet(files["metrics"])
    assert "cpu_mem_avg_gb" not in metrics and list(metrics.cpu_mem_added_gb) == [0.25, 0.25]
    assert all("cpu_mem_avg_gb" not in r for r in json.loads(files["json"].read_text()))
    # the report's results table: the class counts beside every system, named as the run named it
    results = files["markdown"].read_text().split("## Results", 1)[1].split("## Resources", 1)[0]
    assert "| system | good n | defect n | accuracy % |" in results
    assert f"| {labels['qwen_zeroshot']} | 4 | 6 |" in results
    assert files["breakdown_figure"].stat().st_size > 10_000
    # the artifacts and `saec run` show the same names, counts, headings and rounding
    assert info["labels"] == labels
    shown = results_rows(SimpleNamespace(info=info))
    assert [r["system"] for r in shown] == [labels["edge_only"], labels["qwen_zeroshot"]]
    assert (shown[1]["good n"], shown[1]["defect n"]) == ("4", "6") and "measured" in shown[1]
    assert "measured" not in results_rows(SimpleNamespace(info=info), explain=False)[0]
    from rich.console import Console

    from saec.cli import _results_table

    console = Console(width=160, record=True, file=io.StringIO())
    console.print(_results_table("set", SimpleNamespace(info=info)))
    table = console.export_text()
    assert "results: set (4 good, 6 defect)" in table and "good n" in table and "defect n" in table
    assert "stand-in" in table and "zeroshot" not in table and "edge_only" not in table
