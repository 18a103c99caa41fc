"""The whole pipeline under a real Prefect engine, on a small embedded default.

Checks what a user relies on: every system reported with its tables and figure, Prefect
artifacts under keys of their store and configuration, a second run (through the deployed entry point) served from the
store with the first run's measurement, a threshold change re-running only the stages that
depend on it, and a re-evaluation after a change to the training code.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from saec.artifacts.store import Store
from saec.config import load_config

pytestmark = pytest.mark.slow

from conftest import SMALL_PIPELINE as SMALL  # noqa: E402


def _states(out) -> dict[str, str]:
    return {name: st["state"] for name, st in out["run"].record["stages"].items()}


def test_pipeline_reports_every_system_caches_and_reruns_only_what_a_threshold_touches(prefect_server, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from saec.flows.pipeline import pipeline_flow

    base = [*SMALL, f"store.root={tmp_path / 'store'}"]
    first = pipeline_flow(load_config(None, base))
    report = first["reports"]["mvtec_holdout"]
    metrics = pd.read_parquet(report.path("metrics"))
    assert list(metrics.system) == ["saec", "edge_only", "cloud_only", "qwen_zeroshot", "llava_zeroshot"]
    n = first["holdout"].outputs["manifest"].rows
    assert (metrics.n == n).all() and metrics.accuracy.between(0, 1).all()
    saec = metrics.set_index("system").loc["saec"]
    assert saec.wall_s > 0 and saec.serial_s > 0 and saec.measured == "executed"
    assert Path(report.path("figure")).stat().st_size > 10_000
    decisions = pd.read_parquet(report.path("decisions"))
    # the cloud share is that of the SAEC decisions the cloud made, at least the complexity quota
    to_cloud = decisions[decisions.system == "saec"].branch == "cloud"
    assert saec.cloud_share == pytest.approx(to_cloud.mean())
    assert to_cloud.sum() >= round(load_config(None, base).routing.init_q_ratio * n)
    assert len(decisions) == 5 * n and set(decisions.system) == set(metrics.system)
    # every decision names its image: the evaluation file, its source, category and defect type
    manifest = first["holdout"].table("manifest").set_index("image_id")
    assert (decisions.source_path == manifest.source_path.reindex(decisions.image_id).to_numpy()).all()
    assert decisions.path.map(lambda p: Path(p).is_file()).all() and decisions.category.notna().all()
    assert ((decisions.defect_type == "good") == (decisions.label == 0)).all()
    # class counts in the metrics and the header; accuracy per category and per defect type
    assert (metrics.n_good + metrics.n_defect == n).all()
    assert (metrics.n_good == int((manifest.label == 0).sum())).all()
    groups = pd.read_parquet(report.path("breakdown"))
    by_cat = groups[(groups.by == "category") & (groups.system == "saec")].set_index("group")
    assert set(by_cat.index) == set(manifest.category) and by_cat.n.sum() == n
    expected = decisions[decisions.system == "saec"].groupby("category").correct.mean()
    assert (by_cat.accuracy - expected.reindex(by_cat.index)).abs().max() < 1e-12
    assert set(groups[groups.by == "defect_type"].group) == set(manifest.defect_type)
    md = report.path("markdown").read_text()
    assert f"Evaluation set: {n} images" in md and "## Accuracy by category (%)" in md
    assert "## Accuracy by defect type (%)" in md and "stand-in: an embedded tiny model" in md
    # results and resources in two tables (each fits a browser pane), one unit per column, rounded
    results = md.split("## Results", 1)[1].split("## Resources", 1)[0]
    assert "| system | good n | defect n | accuracy % | balanced % |" in results and "wall s" not in results
    assert f"| {100 * saec.accuracy:.1f} |" in results.splitlines()[4]  # the first system's row: SAEC
    assert "| system | wall s | serial s |" in md.split("## Resources", 1)[1]
    assert Path(report.path("breakdown_figure")).stat().st_size > 10_000
    routing = first["run"].record["stages"]["mvtec_holdout/routing"]
    assert sum(routing["info"]["reasons"].values()) == n
    assert all(s == "ran" for s in _states(first).values())
    assert first["run"].record["deployment"] is None and first["run"].record["flow_run_id"]  # started here, not by a deployment

    import asyncio

    from saec.flows.evaluate import artifact_key, artifact_tag

    async def artifacts():
        async with get_client() as client:
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=artifact_tag(cfg))))
            return {a.key: a for a in arts}

    cfg = load_config(None, base)
    published = asyncio.run(artifacts())

    async def run_names():
        async with get_client() as client:
            return {r.name for r in await client.read_flow_runs()}

    # flow runs are named for what they do, with the tag their artifacts' keys carry
    assert {f"pipeline mvtec_holdout [{artifact_tag(cfg)}]", "evaluate mvtec_holdout"} <= asyncio.run(run_names())
    keys = {artifact_key(cfg, "mvtec_holdout", "metrics"), artifact_key(cfg, "mvtec_holdout", "report"),
            f"summary-{artifact_tag(cfg)}"}
    assert keys <= set(published)
    # keyed by store and configuration: another store's runs are not this one's "latest"
    assert artifact_tag(load_config(None, [*SMALL, f"store.root={tmp_path / 'other'}"])) != artifact_tag(cfg)
    table = published[artifact_key(cfg, "mvtec_holdout", "metrics")]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows[0]["system"] == "SAEC" and rows[0]["accuracy %"] == f"{100 * metrics.accuracy.iloc[0]:.1f}"
    assert str(tmp_path / "store") in table.description and first["run"].run_id in table.description
    summary = published[f"summary-{artifact_tag(cfg)}"].data
    assert "## mvtec_holdout" in summary and str(report.path("markdown")) in summary
    # the figures are in the page itself (the browser cannot read the worker's disk): the report's PNGs
    shown = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", published[artifact_key(
        cfg, "mvtec_holdout", "report")].data)
    assert [base64.b64decode(b) for b in shown] == [Path(report.path(k)).read_bytes() for k in ("figure", "breakdown_figure")]
    assert base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)\)", summary).group(1)) == Path(report.path("figure")).read_bytes()

    # the deployed entry point on the same store: every stage found in the store, reported as cached,
    # and SAEC's wall time is the one the first run measured (it names that run)
    from saec.flows.remote import saec_pipeline

    deployed = saec_pipeline(overrides=base)
    assert set(deployed["stages"].values()) == {"cached"}
    second = {"run": Store(tmp_path / "store").open_run(deployed["run_id"]), "reports": {
        "mvtec_holdout": Store(tmp_path / "store").lookup("report", Path(deployed["reports"]["mvtec_holdout"]).name)}}
    again = pd.read_parquet(second["reports"]["mvtec_holdout"].path("metrics"))
    pd.testing.assert_frame_equal(again, metrics)  # the cached SAEC measurement is the one that was taken
    notes = second["reports"]["mvtec_holdout"].info["notes"]
    assert any(f"executed, run {first['run'].run_id}" in n for n in notes), notes

    # the cloud's decision threshold only touches the merge and the report
    third = pipeline_flow(load_config(None, [*base, "routing.cloud_thr=0.6"]))
    ran = {k for k, v in _states(third).items() if v == "ran"}
    assert ran == {"mvtec_holdout/merge", "mvtec_holdout/report"}

    # an edge-confidence threshold also changes which images the cloud sees after the edge
    fourth = pipeline_flow(load_config(None, [*base, "routing.smax_thr=0.9"]))
    ran = {k for k, v in _states(fourth).items() if v == "ran"}
    assert ran <= {"mvtec_holdout/routing", "mvtec_holdout/saec_cloud_unsure", "mvtec_holdout/merge", "mvtec_holdout/report"}
    assert "mvtec_holdout/routing" in ran
    # outputs are content-addressed: the merge runs again only if the routing table changed
    before = third["run"].record["stages"]["mvtec_holdout/routing"]["outputs"]["routing"]["sha256"]
    after = fourth["run"].record["stages"]["mvtec_holdout/routing"]["outputs"]["routing"]["sha256"]
    assert ("mvtec_holdout/merge" in ran) == (before != after)
    # part of SAEC executed: no wall time is made up from a mix of executed and stored work
    saec4 = pd.read_parquet(fourth["reports"]["mvtec_holdout"].path("metrics")).set_index("system").loc["saec"]
    if ran & {"mvtec_holdout/saec_cloud_unsure"}:
        assert pd.isna(saec4.wall_s) and saec4.measured.startswith("not measured: only")


    # a re-evaluation after an edit to the training code (other cache keys for the training
    # stages) evaluates the models the source run used, found from its record
    from saec.flows.reevaluate import reevaluate_flow
    from saec.tasks.drift import DriftConfig
    from saec.tasks.stage import STAGES

    for name in ("train-cloud", "train-edge"):
        monkeypatch.setitem(STAGES[name].__dict__, "code", "edited-training-code")
    out = reevaluate_flow(load_config(None, base), DriftConfig(), fourth["run"].run_id, "test")
    rec = out["run"].record
    assert rec["status"] == "completed" and rec["models_from"] == fourth["run"].run_id
    for stage in ("train_cloud", "train_edge", "sft"):
        assert rec["stages"][stage]["dir"] == first["run"].record["stages"][stage]["dir"]
    assert rec["models_code"]["train_cloud"] == first["run"].record["stages"]["train_cloud"]["code"] != "edited-training-code"
    assert set(st["state"] for st in rec["stages"].values()) == {"cached"} and rec["code_version"]
