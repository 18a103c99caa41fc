"""Own data as a factory engineer brings it, through the command line and the whole pipeline.

A small draw of the embedded generator, reshaped the way real folders come: goods scarce in
`test/`, one category as grey JPEG files, one defect type whose masks are all empty. The run must
say what it is doing and what it took, and its report must break accuracy down by category and
defect type with every decision traceable to its photograph.
"""
from __future__ import annotations

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
    type; grid as grey JPEG; capsule's `crack` masks emptied."""
    from saec.datasets.synthetic import SyntheticConfig, generate_mvtec

    cfg = SyntheticConfig(mvtec_size=96, defect_visibility=6.0, categories=["carpet", "capsule", "grid"],
                          n_train_good=8, n_test_good=2, n_test_defect_per_type=2)
    generate_mvtec(root, cfg)
    for png in sorted((root / "grid").glob("*/*/*.png")):  # images only: masks live under ground_truth
        if png.parts[-3] == "ground_truth":
            continue
        Image.open(png).convert("L").save(png.with_suffix(".jpg"), quality=92)
        png.unlink()
    for mask in (root / "capsule" / "ground_truth" / "crack").glob("*.png"):
        Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(mask)
    return root


def test_unbalanced_grey_jpeg_folders_give_counts_warnings_and_a_per_category_report(prefect_server, tmp_path):
    from saec.cli import app

    data = _own_folders(tmp_path / "mvtec")
    store = tmp_path / "store"
    sets = ["data.source=folders", f"data.mvtec_root={data}", "evaluate.datasets=[mvtec_holdout]",
            "holdout.n_good=10", "holdout.n_defect=10", f"store.root={store}", "edge.train.epochs=1",
            "cloud.train.max_steps=2", "cloud.train.epochs=1", "cloud.train.augment=none", "cloud.score.tta=none"]
    args = [a for s in sets for a in ("--set", s)]
    runner = CliRunner()

    out = runner.invoke(app, ["run", *args])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    # test/ holds 6 goods and 12 defects (less SFT train): the default keeps 1:1 and says so
    assert "warning: holdout: asked for 10 good + 10 defect" in text and "cap_to_smaller took 6 + 6" in text
    assert "results: mvtec_holdout (6 good, 6 defect)" in text
    assert "time s" in text and "edge training" in out.output

    (run,) = [r for r in Store(store).runs() if r.flow == "pipeline"]
    stages = run.record["stages"]
    scan = stages["scan_mvtec"]["info"]["counts"]
    assert scan["defect_with_empty_mask"] == 2 and scan["quarantined"] == 0
    # the cloud model trained on as many defects as goods: 24 goods, 12 defects repeated to 24
    train = stages["train_cloud"]["info"]
    assert train["class_counts"] == {"good": 24, "defect": 12} and train["trained_on"] == {"good": 24, "defect": 24}
    assert all(st["build_s"] is not None for st in stages.values())

    report = stages["mvtec_holdout/report"]
    md = Path(report["outputs"]["markdown"]["path"]).read_text()
    assert "Evaluation set: 12 images, 6 good and 6 defect." in md and "cap_to_smaller took 6 + 6" in md
    assert "## Accuracy by category (%)" in md and "| grid | 4 (2 / 2) |" in md
    assert "embedded stand-in" in md and "CPU memory avg" not in md
    decisions = read_table(report["outputs"]["decisions"]["path"])
    assert set(decisions.category) == {"carpet", "capsule", "grid"}
    grid = decisions[decisions.category == "grid"]
    assert grid.source_path.str.endswith(".jpg").all() and grid.source_path.str.startswith(str(data)).all()
    assert decisions.path.map(lambda p: Path(p).is_file()).all()
    routing = read_table(stages["mvtec_holdout/routing"]["outputs"]["routing"]["path"])
    assert routing.source_path.str.startswith(str(data)).all() and routing.path.notna().all()
    groups = pd.read_parquet(report["outputs"]["breakdown"]["path"])
    saec = groups[(groups.system == "saec") & (groups.by == "defect_type")].set_index("group")
    assert saec.loc["good", "n"] == 6 and saec.n.sum() == 12
    # one verdict threshold: the cloud's scores tables hold probabilities, decisions hold verdicts
    scores = read_table(stages["mvtec_holdout/cloud_only"]["outputs"]["scores"]["path"])
    assert "pred" not in scores
    cloud = decisions[decisions.system == "cloud_only"].set_index("image_id")
    p = scores.set_index("image_id").p_defect.reindex(cloud.index)
    assert (cloud.pred.to_numpy() == (p.to_numpy() >= EMBEDDED_CLOUD_THR)).all()

    # as_available instead: the same folders give 6 goods and all 10 defects asked for, and say so
    out = runner.invoke(app, ["prepare", *args, "--set", "holdout.balance=as_available"])
    assert out.exit_code == 0, out.output
    assert "as_available took 6 + 10" in " ".join(out.output.split())
