"""`saec inspect`: runs, one run's metrics and tables, two runs compared, on a real store."""
from __future__ import annotations

import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from saec.artifacts.store import Store, write_table
from saec.inspect import compare_runs, metrics_frame, read_run_table, resolve_run, runs_frame, tables_frame


def _decisions(n: int, wrong: int) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"{i:064x}" for i in range(n)], "path": [f"val/{i}.png" for i in range(n)],
                         "source_path": [f"src/{i}.png" for i in range(n)], "category": "c",
                         "defect_type": ["good" if i % 2 == 0 else "scratch" for i in range(n)],
                         "label": [i % 2 for i in range(n)],
                         "pred": [(i % 2) ^ (i < wrong) for i in range(n)], "correct": [i >= wrong for i in range(n)],
                         "branch": "edge", "reason": "edge_confident", "score": 0.5, "system": "saec"})  # fmt: skip


def _report(store: Store, key: str, acc: float, share: float, wrong: int, labels: dict | None = None):
    def build(out):
        ref = write_table(_decisions(10, wrong), "decisions", out / "decisions.parquet")
        (out / "report.md").write_text("# report\n")
        rows = [{"system": "saec", "n": 10, "n_good": 4, "n_defect": 6, "accuracy": acc, "balanced_accuracy": acc,
                 "cloud_share": share, "wall_s": 2.0, "serial_s": 3.0, "energy_per_correct_mwh": None,
                 "measured": "executed"}]  # fmt: skip
        info = {"systems": rows} | ({"labels": labels} if labels is not None else {})  # older reports lack labels
        return {"decisions": ref.path, "markdown": out / "report.md"}, info

    return store.build_stage("report", key, build)


@pytest.fixture
def store(tmp_path) -> Store:
    """Two pipeline runs sharing a holdout; the second has its own report and a failed run after it."""
    st = Store(tmp_path / "store")
    holdout = st.build_stage("holdout", "h1", lambda out: ({"manifest": write_table(
        _decisions(10, 0)[["image_id"]].assign(path="p", source_path="s", label=0, category="c", defect_type="good",
                                               split="holdout", width=8, height=8, mode="L"),
        "manifest", out / "manifest.parquet").path}, {}))  # fmt: skip
    for i, (acc, share, wrong, state) in enumerate([(0.9, 0.3, 1, "ran"), (0.7, 0.5, 3, "ran")]):
        run = st.new_run("pipeline")
        run.record["started"] = f"2026-01-0{i + 1}T00:00:00+00:00"
        run.add_stage(holdout, "ran" if i == 0 else "cached", seconds=12.5 if i == 0 else 0.25)
        labels = {"saec": "SAEC (labelled)"} if i == 0 else None
        run.add_stage(_report(st, f"r{i}", acc, share, wrong, labels), state, "mvtec_holdout/report")
        run.finish("completed")
    bad = st.new_run("pipeline")
    bad.record["started"] = "2026-01-03T00:00:00+00:00"
    bad.finish("failed", error="InjectedFailure: injected failure before stage 'train-cloud'")
    return st


def test_runs_frame_and_resolving_runs(store):
    runs = runs_frame(store.root)
    assert list(runs.status) == ["completed", "completed", "failed"]
    assert list(runs.ran) == [2, 1, 0] and list(runs.cached) == [0, 1, 0]
    assert list(runs.datasets) == ["mvtec_holdout", "mvtec_holdout", ""]
    assert runs.error.iloc[2].startswith("InjectedFailure")
    first = runs.run.iloc[0]
    assert resolve_run(store.root, first).run_id == first
    assert resolve_run(store.root, first[-6:]).run_id == first  # a unique part of the id
    assert resolve_run(store.root, "latest").run_id == runs.run.iloc[2]
    with pytest.raises(LookupError, match="matches 3 runs"):
        resolve_run(store.root, "pipeline")
    with pytest.raises(LookupError, match="no run matches"):
        resolve_run(store.root, "nope")
    with pytest.raises(LookupError, match="no reevaluate run"):
        resolve_run(store.root, "latest:reevaluate")


def test_metrics_and_tables_of_one_run(store):
    run = resolve_run(store.root, runs_frame(store.root).run.iloc[1])
    m = metrics_frame(run)
    assert m[["dataset", "system", "accuracy", "cloud_share"]].values.tolist() == [["mvtec_holdout", "saec", 0.7, 0.5]]
    tables = tables_frame(run).set_index("table")
    assert tables.loc["mvtec_holdout/report:decisions", "rows"] == 10
    assert tables.loc["holdout:manifest", "schema"] == "manifest"
    assert "mvtec_holdout/report:markdown" not in tables.index  # only Parquet tables
    df = read_run_table(run, "mvtec_holdout/report:decisions")
    assert len(df) == 10 and int((~df.correct).sum()) == 3
    with pytest.raises(LookupError, match="holdout:manifest"):
        read_run_table(run, "report:metrics")


def test_compare_two_runs(store):
    ids = runs_frame(store.root).run
    metrics, stages = compare_runs(resolve_run(store.root, ids.iloc[0]), resolve_run(store.root, ids.iloc[1]))
    acc = metrics.set_index("metric").loc["accuracy"]
    assert (acc.a, acc.b) == (0.9, 0.7) and acc.change == pytest.approx(-0.2)
    st = stages.set_index("stage")
    assert st.loc["holdout", "same_outputs"] == True  # noqa: E712
    assert (st.loc["holdout", "state_a"], st.loc["holdout", "state_b"]) == ("ran", "cached")
    assert st.loc["mvtec_holdout/report", "same_outputs"] == False  # noqa: E712


def test_command_line(store):
    from saec.cli import app

    ids = runs_frame(store.root).run
    where = ["--set", f"store.root={store.root}"]
    runner = CliRunner()
    out = runner.invoke(app, ["runs", *where])
    assert out.exit_code == 0 and all(i in out.output for i in ids) and "InjectedFailure" in out.output
    out = runner.invoke(app, ["inspect", "show", ids.iloc[0], *where])
    assert out.exit_code == 0, out.output
    assert "mvtec_holdout/report:decisions" in out.output
    # stage times, and the metrics as the report shows them: its names, class counts, headings and rounding
    assert "seconds" in out.output and "12.5" in out.output
    metrics = out.output.split("metrics", 1)[1].split("tables (show one", 1)[0]
    assert "SAEC (labelled)" in metrics and "good n" in metrics and "defect n" in metrics and "accuracy %" in metrics
    assert re.search(r"SAEC \(labelled\)\s*│\s*4\s*│\s*6\s*│\s*90\.0\s*│", metrics), metrics
    out = runner.invoke(app, ["inspect", "show", ids.iloc[1], *where])
    assert out.exit_code == 0 and "70.0" in out.output and "saec" in out.output.split("metrics", 1)[1]  # no labels: the id
    out = runner.invoke(app, ["inspect", "show", ids.iloc[0], "--table", "mvtec_holdout/report:decisions", "--rows", "3", *where])
    assert out.exit_code == 0 and "10 rows x 12 columns" in out.output and "src/2.png" in out.output
    out = runner.invoke(app, ["inspect", "compare", ids.iloc[0], ids.iloc[1], *where])
    assert out.exit_code == 0 and "-0.2" in out.output and "1 of 2 stages used identical outputs" in out.output
    out = runner.invoke(app, ["inspect", "show", "no-such-run", *where])
    assert out.exit_code == 2 and "no run matches" in out.output


def test_latest_prefect_artifacts_by_key(prefect_server):
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact

    from saec.inspect import artifacts_frame

    @flow
    def publish(text: str) -> None:
        create_markdown_artifact(key="drift-inspect-test", markdown=f"# {text}", description=text)

    publish("first")
    publish("second")
    frame = artifacts_frame("%inspect-test%")
    assert frame.key.tolist() == ["drift-inspect-test"] and frame.description.tolist() == ["second"]


def test_a_broken_run_record_is_listed_as_damaged_and_hides_no_other_run(tmp_path):
    from saec.artifacts.store import Store
    from saec.inspect import runs_frame

    store = Store(tmp_path)
    ok = store.new_run("pipeline")
    ok.finish("completed")
    for name, text in (("broken-json", "{not json"), ("no-keys", '{"status": "completed"}'), ("a-list", "[1, 2]")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "run.json").write_text(text)
    frame = runs_frame(tmp_path).set_index("run")
    assert frame.loc[ok.run_id, "status"] == "completed"
    assert list(frame.loc[["a-list", "broken-json", "no-keys"], "status"]) == ["damaged"] * 3
    assert "not valid JSON" in frame.loc["broken-json", "error"] and "lacks" in frame.loc["no-keys", "error"]
    assert store.mark_interrupted() == []  # a damaged record is never rewritten


def test_a_run_links_to_its_flow_run_page_where_a_prefect_ui_is_configured():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from saec.inspect import flow_run_link

    with temporary_settings(updates={PREFECT_API_URL: "http://10.0.0.5:4200/api"}):
        assert flow_run_link({"flow_run_id": "0a1b"}) == "http://10.0.0.5:4200/runs/flow-run/0a1b"
        assert flow_run_link({"flow_run_id": None}) is None  # a run recorded outside Prefect
