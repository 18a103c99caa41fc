"""Own data as a factory engineer brings it, through the command line and the whole pipeline.

A small draw of the embedded generator, reshaped the way real folders come: goods scarce in
`test/`, one category as colour JPEG files beside a grey PNG one, one defect type whose masks are
all empty. The run must say what it is doing and what it took (a short holdout while it runs, not
only at the end), its tables must give the class counts and name the embedded stand-ins as such,
and its report must break accuracy down by category and defect type with every decision and
every per-image table traceable to its photograph.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from saec.artifacts.store import Store, read_table
from saec.config import EMBEDDED_CLOUD_THR

pytestmark = pytest.mark.slow


def _own_folders(root: Path) -> Path:
    """carpet, capsule and grid; 8 train goods and 2 test goods per category, 2 images per defect
    type; carpet as colour JPEG, grid as grey PNG (as drawn); capsule's `crack` masks emptied."""
    from saec.datasets.synthetic import SyntheticConfig, generate_mvtec

    cfg = SyntheticConfig(mvtec_size=96, defect_visibility=6.0, categories=["carpet", "capsule", "grid"],
                          n_train_good=8, n_test_good=2, n_test_defect_per_type=2)
    generate_mvtec(root, cfg)
    for png in sorted((root / "carpet").glob("*/*/*.png")):  # images only: masks live under ground_truth
        if png.parts[-3] == "ground_truth":
            continue
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=92)
        png.unlink()
    for mask in (root / "capsule" / "ground_truth" / "crack").glob("*.png"):
        Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(mask)
    return root


def test_unbalanced_grey_jpeg_folders_give_counts_warnings_and_a_per_category_report(prefect_server, tmp_path):
    from saec.cli import app
    from saec.inspect import _fmt, stages_frame

    data = _own_folders(tmp_path / "mvtec")
    store = tmp_path / "store"
    sets = ["data.source=folders", f"data.mvtec_root={data}", "evaluate.datasets=[mvtec_holdout]",
            "holdout.n_good=10", "holdout.n_defect=10", f"store.root={store}", "edge.train.epochs=1",
            "cloud.train.max_steps=2", "cloud.train.epochs=1", "cloud.train.augment=none", "cloud.score.tta=none"]
    args = [a for s in sets for a in ("--set", s)]
    runner = CliRunner()

    logged: list[logging.LogRecord] = []
    keep = logging.Handler(logging.WARNING)
    keep.emit = logged.append  # type: ignore[method-assign]
    flow_log = logging.getLogger("prefect.flow_runs")
    flow_log.addHandler(keep)
    try:
        out = runner.invoke(app, ["run", *args])
    finally:
        flow_log.removeHandler(keep)
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    # test/ holds 6 goods and 12 defects (less SFT train): the default keeps 1:1 and says so, in the
    # pipeline's own log while it runs (where the terminal shows it) and again in the closing summary
    assert "warning: holdout: asked for 10 good + 10 defect" in text and "cap_to_smaller took 6 + 6" in text
    (run,) = [r for r in Store(store).runs() if r.flow == "pipeline"]
    short = [r for r in logged if "holdout is smaller than asked" in r.getMessage()]
    assert len(short) == 1 and "cap_to_smaller took 6 + 6" in short[0].getMessage()
    assert short[0].flow_run_id == run.record["flow_run_id"]
    assert "results: mvtec_holdout (6 good, 6 defect)" in text
    assert "time s" in text and "edge training" in out.output
    # the results table names the embedded stand-ins as the report does, with each class's count
    table = out.output.split("results: mvtec_holdout", 1)[1].split("\n  - ", 1)[0]
    assert "good n" in table and "defect n" in table and "stand-in" in table
    assert not re.search(r"\b(saec|edge_only|cloud_only|qwen_zeroshot|llava_zeroshot)\b", table), table
    assert re.search(r"SAEC\s*│\s*6\s*│\s*6\s*│", table), table

    stages = run.record["stages"]
    scan = stages["scan_mvtec"]["info"]["counts"]
    assert scan["defect_with_empty_mask"] == 2 and scan["quarantined"] == 0
    images = read_table(stages["scan_mvtec"]["outputs"]["images"]["path"]).set_index("category")
    assert set(images.loc["carpet", "format"]) == {"JPEG"} and set(images.loc["carpet", "mode"]) == {"RGB"}
    assert set(images.loc["grid", "format"]) == {"PNG"} and set(images.loc["grid", "mode"]) == {"L"}
    # the cloud model trained on as many defects as goods: 24 goods, 12 defects repeated to 24
    train = stages["train_cloud"]["info"]
    assert train["class_counts"] == {"good": 24, "defect": 12} and train["trained_on"] == {"good": 24, "defect": 24}
    assert all(st["build_s"] is not None for st in stages.values())

    report = stages["mvtec_holdout/report"]
    md = Path(report["outputs"]["markdown"]["path"]).read_text()
    assert "Evaluation set: 12 images, 6 good and 6 defect." in md and "cap_to_smaller took 6 + 6" in md
    assert "## Accuracy by category (%)" in md and "| grid | 4 (2 / 2) |" in md
    assert "stand-in: an embedded tiny model" in md and "CPU memory avg" not in md
    results = md.split("## Results", 1)[1].split("## Resources", 1)[0]
    assert "| system | good n | defect n |" in results and "| SAEC | 6 | 6 |" in results
    assert "| Qwen zero-shot (stand-in) | 6 | 6 |" in results
    assert Path(report["outputs"]["breakdown_figure"]["path"]).stat().st_size > 10_000
    metrics = pd.read_parquet(report["outputs"]["metrics"]["path"])
    assert "cpu_mem_avg_gb" not in metrics and metrics.cpu_mem_added_gb.notna().all()
    decisions = read_table(report["outputs"]["decisions"]["path"])
    assert set(decisions.category) == {"carpet", "capsule", "grid"}
    carpet, grid = decisions[decisions.category == "carpet"], decisions[decisions.category == "grid"]
    assert carpet.source_path.str.endswith(".jpg").all() and grid.source_path.str.endswith(".png").all()
    assert decisions.source_path.str.startswith(str(data)).all()
    assert decisions.path.map(lambda p: Path(p).is_file()).all()
    # every per-image table names the user's file beside the image id, as the holdout's manifest does
    source = read_table(stages["holdout"]["outputs"]["manifest"]["path"]).set_index("image_id").source_path
    per_image = {"routing": ("mvtec_holdout/routing", "routing"), "complexity": ("mvtec_holdout/complexity", "complexity"),
                 "saec edge": ("mvtec_holdout/saec_edge", "predictions"), "edge only": ("mvtec_holdout/edge_only", "predictions"),
                 "cloud scores": ("mvtec_holdout/cloud_only", "scores"), "quota scores": ("mvtec_holdout/saec_cloud_quota", "scores")}  # fmt: skip
    for what, (name, output) in per_image.items():
        t = read_table(stages[name]["outputs"][output]["path"])
        assert len(t) and list(t.columns[:3]) == ["image_id", "path", "source_path"], what
        assert (t.source_path.to_numpy() == source.reindex(t.image_id).to_numpy()).all(), what
    groups = pd.read_parquet(report["outputs"]["breakdown"]["path"])
    saec = groups[(groups.system == "saec") & (groups.by == "defect_type")].set_index("group")
    assert saec.loc["good", "n"] == 6 and saec.n.sum() == 12
    # one verdict threshold: the cloud's scores tables hold probabilities, decisions hold verdicts
    scores = read_table(stages["mvtec_holdout/cloud_only"]["outputs"]["scores"]["path"])
    assert "pred" not in scores
    cloud = decisions[decisions.system == "cloud_only"].set_index("image_id")
    p = scores.set_index("image_id").p_defect.reindex(cloud.index)
    assert (cloud.pred.to_numpy() == (p.to_numpy() >= EMBEDDED_CLOUD_THR)).all()

    # saec inspect show: every stage with this run's time and its build's, and the report's results
    out = runner.invoke(app, ["inspect", "show", "latest:pipeline", "--set", f"store.root={store}"])
    assert out.exit_code == 0, out.output
    assert "seconds" in out.output and "build_s" in out.output
    timed = stages_frame(run).set_index("stage")
    assert timed.seconds.notna().all() and _fmt(timed.loc["train_cloud", "seconds"]) in out.output
    shown = out.output.split("metrics", 1)[1]
    assert "good n" in shown and "stand-in" in shown and re.search(r"SAEC\s*│\s*6\s*│\s*6\s*│", shown)

    # as_available instead: the same folders give 6 goods and all 10 defects asked for, and say so
    out = runner.invoke(app, ["prepare", *args, "--set", "holdout.balance=as_available"])
    assert out.exit_code == 0, out.output
    assert "as_available took 6 + 10" in " ".join(out.output.split())
