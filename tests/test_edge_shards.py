"""Edge prediction as shards: a placement that asks for shards gets the same predictions as one
stage run, each shard cached under its own key, and a run record that lists the shards.

Real image files, real Parquet tables, the real stage machinery (`call_stage`, `collect`, the
store), the embedded edge stand-in at a small image size; the placement runs the shards in this
process, side by side, as the edge pool's workers would.
"""
from __future__ import annotations

import contextvars
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from saec.artifacts.schemas import MEASURED_COLUMNS, SCHEMAS
from saec.artifacts.store import Store, published_path, read_table, write_table
from saec.flows.common import call_stage, collect, placed, run_here, submit_stage
from saec.flows.remote import RemoteConfig, RemoteStages, StageFuture
from saec.tasks.edge.config import EdgeConfig
from saec.tasks.edge.task import edge_shards_merge, predict_edge_task, train_edge_task
from saec.tasks.stage import Shard, keyable, stage_of
from saec.tasks.telemetry import TelemetryConfig, combine_summaries, serial_samples


N_IMAGES = 13  # with batches of 3: five batches, the last of one image
CFG = EdgeConfig(mode="supervised", imgsz=32, batch_size=3, threads=1, io_threads=1, progress=False)


class LocalShards:
    """Runs the edge prediction stage in this process, as `count` shards side by side."""

    def __init__(self, count: int):
        self.count = count
        self.pool = ThreadPoolExecutor(max_workers=count)
        self.submitted: list[dict] = []

    def owns(self, task) -> bool:
        return task.name == predict_edge_task.name

    def shards(self, task) -> int:
        return self.count

    def run(self, task, params):
        return run_here(task, params)

    def submit(self, task, params, wait_for):
        self.submitted.append(params)
        return StageFuture(self.pool.submit(contextvars.copy_context().run, run_here, task, params))


def _write_images(out: Path, seed: int, replace: int | None = None) -> tuple[dict, dict]:
    rows = []
    for i in range(N_IMAGES):
        rng = np.random.default_rng(seed + (1000 if i == replace else 0) + i)
        path = out / "val" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        rows.append({"image_id": f"img{i:03d}-{seed + (1000 if i == replace else 0)}", "path": str(published_path(path)),
                     "source_path": f"/data/{i:03d}.png" if i % 4 else None, "label": i % 2, "category": "c",
                     "defect_type": "good" if i % 2 == 0 else "scratch", "split": "holdout", "width": 48,
                     "height": 40, "mode": "RGB"})  # fmt: skip
    write_table(pd.DataFrame(rows), "manifest", out / "manifest.parquet")
    return {"manifest": out / "manifest.parquet", "val": out / "val"}, {"images": N_IMAGES}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A small evaluation set in a store, and the same set with one image replaced (row 7)."""
    root = tmp_path_factory.mktemp("shards")
    store = Store(root / "store")
    base = store.build_stage("test_images", "base", lambda out: _write_images(out, seed=0))
    changed = store.build_stage("test_images", "changed", lambda out: _write_images(out, seed=0, replace=7))
    return root, base, changed


def _params(store: Path, images, label: str = "set/edge_only", cfg: EdgeConfig = CFG) -> dict:
    return dict(store=str(store), images=images, table="manifest", trained=None, sft=images, cfg=cfg,
                telemetry=TelemetryConfig(interval_s=0.05), label=label)  # fmt: skip


def _identity(result) -> str:
    return result.outputs["predictions"].identity


def test_shard_bounds_cut_whole_blocks_in_order():
    cuts = [Shard(index=i, count=3).bounds(13, 3) for i in range(3)]
    assert cuts == [(0, 6), (6, 12), (12, 13)]  # five blocks of 3: 2, 2, 1 blocks
    assert [Shard(index=i, count=4).bounds(5, 3) for i in range(4)] == [(0, 3), (3, 5), (5, 5), (5, 5)]
    assert [Shard(index=i, count=2).bounds(0, 3) for i in range(2)] == [(0, 0), (0, 0)]
    assert Shard(index=1, count=2).name == "2of2"
    with pytest.raises(ValueError, match="not below"):
        Shard(index=2, count=2)
    assert stage_of(predict_edge_task).merged_by is stage_of(edge_shards_merge)
    assert stage_of(train_edge_task).merged_by is None


# int8: every shard calibrates its ranges on the same sample of the whole table, as one run does
@pytest.mark.parametrize("count, cfg", [(2, CFG), (3, CFG), (2, CFG.model_copy(update={"precision": "int8"}))],
                         ids=["2-shards", "3-shards", "2-shards-int8"])  # fmt: skip
def test_sharded_predictions_equal_one_stage_run_and_the_record_lists_the_shards(images, count, cfg, prefect_server):
    root, base, _ = images
    store = root / "store"
    run = Store(store).new_run("test")
    whole = call_stage(run, predict_edge_task, name="set/whole", **_params(store, base, cfg=cfg))
    with placed(LocalShards(count)) as placement:
        merged = call_stage(run, predict_edge_task, name="set/edge_only", **_params(store, base, cfg=cfg))
    runtime = "onnxruntime-int8" if cfg.precision == "int8" else "onnxruntime"
    assert whole.info["run"]["runtime"] == merged.info["run"]["runtime"] == runtime
    assert merged.stage == "edge_shards_merge" and set(merged.outputs) == set(whole.outputs) == {"predictions", "telemetry"}
    # the same table for the stages that read it: the identity without the measured columns
    assert _identity(merged) == _identity(whole) and merged.outputs["predictions"].rows == N_IMAGES
    # ... and so one identity as an input: a stage reading it (cloud scoring) is not built again for shards
    assert merged.digest() == whole.digest() and keyable(merged) == keyable(whole)
    a, b = read_table(merged.path("predictions")), read_table(whole.path("predictions"))
    assert list(a.columns) == SCHEMAS["edge_predictions"].names
    kept = [c for c in a.columns if c not in MEASURED_COLUMNS["edge_predictions"]]
    pd.testing.assert_frame_equal(a[kept], b[kept])
    assert a.batch_index.tolist() == b.batch_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    # each shard classified a contiguous run of whole batches of the table, under its own label
    assert [p["shard"] for p in placement.submitted] == [Shard(index=i, count=count) for i in range(count)]
    assert [p["label"] for p in placement.submitted] == [f"set/edge_only#{i}of{count}" for i in range(1, count + 1)]
    stages = run.record["stages"]
    names = [f"set/edge_only#{i}of{count}" for i in range(1, count + 1)]
    assert [n for n in stages if n.startswith("set/edge_only")] == ["set/edge_only", *names]
    assert all(stages[n]["state"] == "ran" for n in ["set/edge_only", *names])
    shards = [stages[n] for n in names]
    rows = [s["info"]["shard"]["rows"] for s in shards]
    assert rows == [list(Shard(index=i, count=count).bounds(N_IMAGES, 3)) for i in range(count)]
    assert [s["outputs"]["predictions"]["rows"] for s in shards] == [stop - start for start, stop in rows]
    assert len({s["key"] for s in shards}) == count
    # the merged information: images and serial seconds add up, the wall span is the longest shard's
    info = merged.info
    seconds = [s["info"]["seconds"] for s in shards]
    assert info["images"] == N_IMAGES and info["seconds"] == pytest.approx(sum(seconds))
    assert info["span_s"] == max(seconds) and [s["key"] for s in info["shards"]] == [s["key"] for s in shards]
    assert info["run"]["n_images"] == info["run"]["rows"] == N_IMAGES and info["run"]["shards"] == count
    assert info["run"]["defect_verdicts"] == int(a.verdict.sum()) and info["run"]["model_id"] == whole.info["run"]["model_id"]
    assert info["telemetry"]["samples"] == sum(s["info"]["telemetry"]["samples"] for s in shards)
    samples = read_table(merged.path("telemetry"))
    assert len(samples) == info["telemetry"]["samples"] and samples.t.is_monotonic_increasing


def test_each_shard_is_cached_under_its_own_key(images, prefect_server):
    root, base, changed = images
    store = root / "store-cache"  # a store of its own: no shard of it is built yet

    def sharded(name: str, source, submitted: bool = False) -> tuple[dict, object]:
        run = Store(store).new_run("test")
        with placed(LocalShards(2)):
            if submitted:  # as SAEC's edge is: submitted, then collected
                params = _params(store, source, name)
                out = collect(run, submit_stage(predict_edge_task, **params), name, predict_edge_task, **params)
            else:
                out = call_stage(run, predict_edge_task, name=name, **_params(store, source, name))
        return {n: s["state"] for n, s in run.record["stages"].items()}, out

    states, first = sharded("set/edge_only", base)
    assert states == {"set/edge_only": "ran", "set/edge_only#1of2": "ran", "set/edge_only#2of2": "ran"}
    # the shards ran side by side with no ONNX graph cached yet: one was exported, both used it
    assert (read_table(first.path("predictions")).runtime == "onnxruntime").all()
    # again: every shard and the merge from the store, the label (observed, not keyed) aside
    states, again = sharded("set/saec_edge", base, submitted=True)
    assert states == {"set/saec_edge": "cached", "set/saec_edge#1of2": "cached", "set/saec_edge#2of2": "cached"}
    assert again.key == first.key
    # one shard's output gone: that shard alone is built again; its content is the same, so is the merge's key
    shutil.rmtree(Store(store).stage_dir("predict_edge", first.info["shards"][1]["key"]))
    states, rebuilt = sharded("set/edge_only", base)
    assert states == {"set/edge_only": "partly cached", "set/edge_only#1of2": "cached", "set/edge_only#2of2": "ran"}
    assert rebuilt.key == first.key
    # One image replaced (row 7, in the first of two shards): the shards are keyed by the input
    # stage's identity, as the unsharded stage is, so both shards run again; the merged table
    # differs from the first in that image's row only (the files lie in another stage folder).
    states, other = sharded("set/edge_only", changed)
    assert set(states.values()) == {"ran"}
    a, b = read_table(first.path("predictions")), read_table(other.path("predictions"))
    measures = ["image_id", "p_defect", "smax", "margin", "entropy"]
    assert (a[measures] != b[measures]).any(axis=1).tolist() == [i == 7 for i in range(N_IMAGES)]


def test_shard_telemetry_adds_up_as_serial_work():
    a = {"samples": 3, "cpu_percent_avg": 100.0, "cpu_mem_peak_gb": 1.0, "cpu_mem_added_gb": 0.2, "cpu_energy_wh": 0.5,
         "gpu_energy_wh": None, "wall_s": 2.0}
    b = {"samples": 1, "cpu_percent_avg": 200.0, "cpu_mem_peak_gb": 3.0, "cpu_mem_added_gb": 0.1, "cpu_energy_wh": 0.25,
         "gpu_energy_wh": None, "wall_s": 1.0}  # fmt: skip
    both = combine_summaries([a, b])
    assert both["samples"] == 4 and both["cpu_percent_avg"] == 125.0 and both["wall_s"] == 3.0
    assert both["cpu_mem_peak_gb"] == 3.0 and both["cpu_mem_added_gb"] == 0.2  # each shard in a process of its own
    assert both["energy_wh"] == 0.75 and both["energy_sources"] == "cpu"
    # a shard on a machine without an energy counter: no total energy, rather than a part of it
    assert combine_summaries([a, b | {"cpu_energy_wh": None}])["energy_wh"] is None
    frames = [pd.DataFrame({"t": [0.0, 1.0], "cpu_energy_j": [0.0, 5.0]}), pd.DataFrame({"t": [0.0, 2.0], "cpu_energy_j": [0.0, 1.0]})]
    serial = serial_samples(frames)
    assert serial.t.tolist() == [0.0, 1.0, 1.0, 3.0] and serial.cpu_energy_j.tolist() == [0.0, 5.0, 5.0, 6.0]


def test_remote_placement_shards_edge_prediction_only():
    stages = RemoteStages(RemoteConfig(edge_shards=3))
    try:
        assert stages.shards(predict_edge_task) == 3 and stages.shards(train_edge_task) == 1
    finally:
        stages.close()
    plain = RemoteStages(RemoteConfig())
    assert plain.shards(predict_edge_task) == 1
    plain.close()
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        RemoteConfig(edge_shards=0)
