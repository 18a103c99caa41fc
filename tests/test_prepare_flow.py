"""The `prepare` flow under a real Prefect engine: cache hits, partial re-runs, the leakage stop."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_ksdd2, make_mvtec, noise, save
from saec.config import load_config
from saec.tasks.data import LeakageError


def _states(out) -> dict[str, str]:
    return {name: st["state"] for name, st in out["run"].record["stages"].items()}


def _cfg(tmp_path, mvtec, ksdd2):
    return load_config(
        None,
        [
            "data.source=folders",
            f"data.mvtec_root={mvtec}",
            f"data.ksdd2_root={ksdd2}",
            f"store.root={tmp_path / 'store'}",
            "holdout.n_good=3",
            "holdout.n_defect=3",
        ],
    )


def test_prepare_caches_reruns_only_what_changed_and_stops_on_leakage(prefect_server, tmp_path):
    from saec.flows.prepare import prepare_flow

    mvtec = make_mvtec(tmp_path / "mvtec")
    ksdd2 = make_ksdd2(tmp_path / "ksdd2")
    cfg = _cfg(tmp_path, mvtec, ksdd2)
    stages = {"scan_mvtec", "sft", "holdout", "scan_ksdd2", "ksdd2_1to1"}

    first = prepare_flow(cfg)
    assert _states(first) == {s: "ran" for s in stages}
    assert first["holdout"].outputs["manifest"].rows == 6
    assert first["run"].record["checks"]["leakage"]["files_checked"] == 6
    for path in first["holdout"].table("manifest").path:  # the manifest names the published files
        assert Path(path).is_file() and Path(path).is_relative_to(first["holdout"].dir)

    second = prepare_flow(cfg)
    assert _states(second) == {s: "cached" for s in stages}
    assert second["holdout"].digest() == first["holdout"].digest()
    # every stage is timed: this run's seconds, and for a stored one what its build took then
    for name in stages:
        ran, hit = first["run"].record["stages"][name], second["run"].record["stages"][name]
        assert ran["seconds"] >= ran["build_s"] > 0 and hit["build_s"] == ran["build_s"]
        assert 0 <= hit["seconds"] < ran["seconds"] + 5
    from saec.inspect import stages_frame

    frame = stages_frame(second["run"]).set_index("stage")
    assert frame.loc["scan_mvtec", "build_s"] == first["run"].record["stages"]["scan_mvtec"]["build_s"]

    # a table of a cached stage truncated on disk: that stage is built again, nothing after it
    table = second["scan_ksdd2"].path("images")
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    healed = prepare_flow(cfg)
    assert _states(healed) == {s: "ran" if s == "scan_ksdd2" else "cached" for s in stages}
    assert len(healed["scan_ksdd2"].table("images")) == len(first["scan_ksdd2"].table("images"))

    # one MVTec image changes: only the MVTec stages run again
    save(mvtec / "alpha" / "test" / "good" / "000.png", noise((32, 32, 3), 4242))
    third = prepare_flow(cfg)
    assert _states(third) == {"scan_mvtec": "ran", "sft": "ran", "holdout": "ran", "scan_ksdd2": "cached", "ksdd2_1to1": "cached"}

    # an output deleted from the store is rebuilt, not handed back as a dangling reference
    shutil.rmtree(third["ksdd2_1to1"].dir)
    fourth = prepare_flow(cfg)
    assert _states(fourth)["ksdd2_1to1"] == "ran" and Path(fourth["ksdd2_1to1"].dir, "val").is_dir()

    # a training image dropped into the holdout stops the run with a clear message
    train_img = fourth["sft"].table("train_manifest").path.iloc[0]
    shutil.copy(train_img, Path(fourth["holdout"].dir) / "val" / "good" / "intruder.png")
    with pytest.raises(LeakageError, match="also in the SFT train split"):
        prepare_flow(cfg)
    records = [json.loads(p.read_text()) for p in (tmp_path / "store" / "runs").glob("*/run.json")]
    (failed,) = [r for r in records if r["status"] == "failed"]
    assert "LeakageError" in failed["error"] and len(records) == 6


def test_a_short_holdout_is_warned_about_in_the_run_log_while_the_flow_runs(prefect_server, tmp_path):
    """The warning goes through the flow run's logger (the terminal and the run's log show it) when the
    set is built and when it comes from the store, not only in the command's closing summary."""
    import logging

    from saec.flows.prepare import prepare_flow

    mvtec = make_mvtec(tmp_path / "mvtec")  # test/ less the SFT train images: 6 goods, 4 defects
    cfg = load_config(None, ["data.source=folders", f"data.mvtec_root={mvtec}", f"store.root={tmp_path / 'store'}",
                             "holdout.n_good=10", "holdout.n_defect=10"])  # fmt: skip
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler, logger = Keep(logging.WARNING), logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    try:
        first = prepare_flow(cfg)
        second = prepare_flow(cfg)
    finally:
        logger.removeHandler(handler)
    assert [_states(o)["holdout"] for o in (first, second)] == ["ran", "cached"]
    warned = [r for r in seen if "holdout is smaller than asked" in r.getMessage()]
    assert len(warned) == 2 and all(r.levelno == logging.WARNING for r in warned)
    assert "asked for 10 good + 10 defect" in warned[0].getMessage() and "cap_to_smaller took 4 + 4" in warned[0].getMessage()
    assert {r.flow_run_id for r in warned} == {first["run"].record["flow_run_id"], second["run"].record["flow_run_id"]}
