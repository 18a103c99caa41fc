"""The artifact store on object storage, against a real S3 API server (moto's, in its own process).

"Machines" here are processes' views with their own SAEC_HOME (each its own mirror and content
cache); what they share is the bucket.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from servers import S3Server

from saec.artifacts.hashing import sha256_file
from saec.artifacts.remote import ObjectStoreError
from saec.artifacts.store import (Store, StoreError, read_paths, read_table, with_read_paths,
                                  write_table)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server(log=tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server


@pytest.fixture
def bucket(s3, monkeypatch, request):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3.bucket}/{request.node.name[:40]}"


def as_machine(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("SAEC_HOME", str(home))


def _build(text: str):
    def build(out: Path):
        (out / "table").mkdir()
        ref = write_table(pd.DataFrame({"image_id": ["a"], "path": ["/x/a.png"], "source_path": ["/x/a.png"],
                                        "label": [1], "category": ["c"], "defect_type": ["d"], "split": ["holdout"],
                                        "width": [1], "height": [1], "mode": ["L"]}), "manifest", out / "table" / "m.parquet")  # fmt: skip
        (out / "note.txt").write_text(text)
        (out / "empty").mkdir()
        os.symlink("/nowhere/on/this/machine.png", out / "table" / "link.png")
        return {"table": out / "table", "note": out / "note.txt", "manifest": Path(ref.path), "empty": out / "empty"}, {"text": text}

    return build


def test_an_output_built_on_one_machine_is_read_on_another_and_the_record_is_the_marker(bucket, tmp_path, monkeypatch):
    as_machine(monkeypatch, tmp_path / "a")
    a = Store(bucket)
    assert a.root.is_relative_to(tmp_path / "a") and a.location == bucket
    built, reused = a.get_or_build("demo", "k1", _build("first"))
    assert not reused and Path(built.outputs["note"].path).is_relative_to(tmp_path / "a")

    as_machine(monkeypatch, tmp_path / "b")
    b = Store(bucket)
    got = b.lookup("demo", "k1")
    assert got is not None and got.digest() == built.digest() and got.info == {"text": "first"}
    assert Path(got.outputs["note"].path).read_text() == "first"
    assert Path(got.outputs["note"].path).is_relative_to(tmp_path / "b")  # its own copy, not a's files
    assert Path(got.outputs["empty"].path).is_dir()
    assert os.readlink(Path(got.outputs["table"].path) / "link.png") == "/nowhere/on/this/machine.png"
    assert pd.read_parquet(got.outputs["manifest"].path).image_id.tolist() == ["a"]
    # a mirror handed on as a folder path is still the object store
    assert Store(str(b.root)).location == bucket

    # no record in the object store, no output: the blobs alone are not one
    b.remote.delete("stages/demo/k1/_stage.json")
    assert Store(bucket).lookup("demo", "k1") is None
    as_machine(monkeypatch, tmp_path / "a")
    assert Store(bucket).lookup("demo", "k1") is None  # a's mirror still has it, but it was not published


def test_the_first_build_of_a_key_to_publish_wins_on_every_machine(bucket, tmp_path, monkeypatch):
    as_machine(monkeypatch, tmp_path / "a")
    a = Store(bucket)
    first, _ = a.get_or_build("demo", "k2", _build("from a"))
    as_machine(monkeypatch, tmp_path / "b")
    b = Store(bucket)
    # b built the same key at the same time and comes to publish second: it takes a's output
    with b._lock("demo", "k2"):
        lost = b._build_locked("demo", "k2", _build("from b"), (), "")
    assert lost is None
    got, reused = b.get_or_build("demo", "k2", _build("from b"))
    assert reused and Path(got.outputs["note"].path).read_text() == "from a"
    assert not list((b.root / "stages" / "demo").glob(".k2.building-*"))  # its own build was removed


def test_a_failed_build_publishes_nothing(bucket, tmp_path, monkeypatch):
    as_machine(monkeypatch, tmp_path / "a")
    a = Store(bucket)

    def broken(out: Path):
        (out / "half.txt").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        a.get_or_build("demo", "k3", broken)
    assert a.remote.read("stages/demo/k3/_stage.json") is None
    assert a.lookup("demo", "k3") is None


def test_an_altered_blob_is_refused_with_a_one_line_reason(bucket, tmp_path, monkeypatch):
    as_machine(monkeypatch, tmp_path / "a")
    built, _ = Store(bucket).get_or_build("demo", "k4", _build("kept"))
    sha = sha256_file(built.outputs["note"].path)
    Store(bucket).remote.write(f"blobs/{sha}", b"tampered")
    as_machine(monkeypatch, tmp_path / "b")
    with pytest.raises(ObjectStoreError, match="other content") as err:
        Store(bucket).lookup("demo", "k4")
    assert "\n" not in str(err.value)


def test_a_mirror_file_altered_in_place_is_fetched_anew_not_built_again(bucket, tmp_path, monkeypatch):
    """The mirror's files share their content with this machine's cache of fetched files: one edited
    in place is fetched again from the object store (nothing is built again, the store holds it)."""
    as_machine(monkeypatch, tmp_path / "a")
    Store(bucket).get_or_build("demo", "k5", _build("kept"))
    as_machine(monkeypatch, tmp_path / "b")
    got = Store(bucket).lookup("demo", "k5")
    note = Path(got.outputs["note"].path)
    with open(note, "r+") as f:  # same size, other content, same inode
        f.write("KEPT")

    def never(out: Path):
        raise AssertionError("built again although the object store holds the output")

    again, reused = Store(bucket).get_or_build("demo", "k5", never)
    assert reused and Path(again.outputs["note"].path).read_text() == "kept"


@pytest.mark.parametrize("damage", ["climbs out", "absolute", "under a link", "no hash", "another key", "not json"])
def test_a_record_that_would_write_outside_its_output_is_refused_and_nothing_is_written(bucket, tmp_path, monkeypatch, damage):
    """Whoever can write to the bucket can write records: one naming files outside its folder (or
    otherwise not a record of this key) is refused with a line naming the object to delete, and no
    file is placed anywhere on the reading machine."""
    as_machine(monkeypatch, tmp_path / "a")
    a, key = Store(bucket), f"k6-{damage.replace(' ', '-')}"
    a.get_or_build("demo", key, _build("honest"))
    record = json.loads(a.remote.read(f"stages/demo/{key}/_stage.json"))
    entry = record["files"].pop("note.txt")
    record["files"].update({
        "climbs out": {"../../../../escaped.txt": entry},
        "absolute": {str(tmp_path / "escaped.txt"): entry},
        "under a link": {"table/link.png/escaped.txt": entry},
        "no hash": {"note.txt": {"size": entry["size"]}},
        "another key": {"note.txt": entry},
        "not json": {},
    }[damage])
    if damage == "another key":
        record["key"] = "k0"
    a.remote.write(f"stages/demo/{key}/_stage.json", b"{ not json" if damage == "not json" else json.dumps(record).encode())

    as_machine(monkeypatch, tmp_path / "b")
    with pytest.raises(StoreError, match=f"stages/demo/{key}/_stage.json .* is refused .*delete that object") as err:
        Store(bucket).lookup("demo", key)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (Store(bucket).stage_dir("demo", key)).exists()


def test_a_worker_fetches_only_the_images_of_its_rows_by_content(bucket, tmp_path, monkeypatch):
    src = tmp_path / "dataset"
    src.mkdir()
    paths = []
    for i in range(4):
        p = src / f"img{i}.png"
        p.write_bytes(f"image {i}".encode())
        paths.append(str(p))
    frame = pd.DataFrame({"image_id": [sha256_file(p) for p in paths], "path": paths})
    as_machine(monkeypatch, tmp_path / "a")
    assert Store(bucket).share_files(frame.path, frame.image_id) == 4
    assert Store(bucket).share_files(frame.path, frame.image_id) == 0  # already there

    as_machine(monkeypatch, tmp_path / "b")
    mine = with_read_paths(bucket, frame.iloc[[1, 3]])
    local = read_paths(mine)
    assert [Path(p).read_bytes() for p in local] == [b"image 1", b"image 3"]
    assert all(Path(p).is_relative_to(tmp_path / "b") and p.endswith(".png") for p in local)
    assert len(list((tmp_path / "b" / "blobs").rglob("*.png"))) == 2  # only the rows asked for
    assert mine.path.tolist() == [paths[1], paths[3]]  # what tables record is unchanged
    Path(local[0]).write_bytes(b"altered here")  # a copy that no longer has its content is fetched again
    assert [Path(p).read_bytes() for p in read_paths(with_read_paths(bucket, frame.iloc[[1]]))] == [b"image 1"]

    missing = pd.DataFrame({"image_id": ["0" * 64], "path": ["/gone.png"]})
    with pytest.raises(ObjectStoreError, match="lacks 1 file"):
        with_read_paths(bucket, missing)


def test_the_edge_stage_on_a_machine_without_the_scanned_files_reads_them_by_content(bucket, tmp_path, monkeypatch,
                                                                                     prefect_server):  # fmt: skip
    """The tables keep the path where the scanning machine found each image; a worker that has no
    such file classifies the copies it fetched by content, and its predictions are the scanning
    machine's."""
    import numpy as np
    from PIL import Image

    from saec.flows.common import call_stage
    from saec.flows.remote import localize
    from saec.tasks.edge.config import EdgeConfig
    from saec.tasks.edge.task import predict_edge_task
    from saec.tasks.telemetry import TelemetryConfig

    def images(out: Path):  # a scan: a table naming the files where this machine found them
        rows = []
        for i in range(5):
            path = tmp_path / "a" / "dataset" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
            rows.append({"image_id": sha256_file(path), "path": str(path), "source_path": None, "label": i % 2,
                         "category": "c", "defect_type": "good" if i % 2 == 0 else "scratch", "split": "holdout",
                         "width": 48, "height": 40, "mode": "RGB"})  # fmt: skip
        ref = write_table(pd.DataFrame(rows), "manifest", out / "manifest.parquet")
        return {"manifest": Path(ref.path)}, {}

    as_machine(monkeypatch, tmp_path / "a")
    a = Store(bucket)
    scanned = a.build_stage("test_images", "k7", images)
    table = scanned.table("manifest")
    a.share_files(table.path, table.image_id)
    cfg = EdgeConfig(mode="supervised", imgsz=32, batch_size=2, threads=1, io_threads=1, progress=False)
    params = dict(store=bucket, images=scanned, table="manifest", trained=None, sft=scanned, cfg=cfg,
                  telemetry=TelemetryConfig(interval_s=0.05), label="set/edge")  # fmt: skip
    there = call_stage(a.new_run("test"), predict_edge_task, name="set/edge", **params)
    a.remote.delete(f"stages/predict_edge/{there.key}/_stage.json")  # so that the other machine builds it

    (tmp_path / "a").rename(tmp_path / "gone")  # no file the tables name is on the other machine
    assert not any(Path(p).exists() for p in table.path)
    as_machine(monkeypatch, tmp_path / "b")
    run = Store(bucket).new_run("test")
    here = call_stage(run, predict_edge_task, name="set/edge", **localize(params))  # as a worker gets them
    assert run.record["stages"]["set/edge"]["state"] == "ran" and here.key == there.key
    assert Path(here.path("predictions")).is_relative_to(tmp_path / "b")
    assert here.outputs["predictions"].identity == there.outputs["predictions"].identity
    assert read_table(here.path("predictions")).path.tolist() == table.path.tolist()  # the table still names them


def test_run_records_and_dispatch_notes_are_shared(bucket, tmp_path, monkeypatch):
    as_machine(monkeypatch, tmp_path / "a")
    run = Store(bucket).new_run("pipeline")
    run.record["stages"]["x"] = {"state": "ran"}
    run.save()
    Store(bucket).write_doc("dispatch/abc.json", {"key": "k"})
    as_machine(monkeypatch, tmp_path / "b")
    b = Store(bucket)
    assert [r.run_id for r in b.runs()] == [run.run_id]
    assert b.open_run(run.run_id).record["stages"] == {"x": {"state": "ran"}}
    assert b.read_doc("dispatch/abc.json") == {"key": "k"}
    assert b.read_doc("dispatch/other.json") is None


def test_the_configuration_keeps_an_object_store_url_and_refuses_bad_ones(bucket):
    from saec.config import ConfigError, load_config

    cfg = load_config(None, [f"store.root={bucket}/"])
    assert cfg.store.root == bucket and cfg.store.location == bucket
    assert cfg.store.resolved().root == bucket
    with pytest.raises(ConfigError, match="names no bucket"):
        load_config(None, ["store.root=s3://"])
    with pytest.raises(ConfigError, match="not a storage scheme"):
        load_config(None, ["store.root=nosuchscheme://bucket/x"])


def test_a_store_it_cannot_write_fails_before_work_with_the_fix(s3, tmp_path):
    env = {**os.environ, **s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong", "SAEC_HOME": str(tmp_path / "h")}
    code = "from saec.artifacts.store import Store; Store('s3://no-such-bucket-here/x').check_writable()"
    done = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "ObjectStoreError" in last and "s3://no-such-bucket-here/x" in last and "AWS_ACCESS_KEY_ID" in last


def test_a_key_published_elsewhere_while_this_machine_waited_for_its_lock_is_taken(bucket, tmp_path, monkeypatch):
    """The second look under the key's lock fetches what another machine published meanwhile
    (and does not wait for the lock it holds itself)."""
    as_machine(monkeypatch, tmp_path / "a")
    Store(bucket).get_or_build("demo", "k5", _build("from a"))
    as_machine(monkeypatch, tmp_path / "b")
    b = Store(bucket)
    looks = []
    monkeypatch.setattr(b, "lookup", lambda stage, key: looks.append(key))  # b's first look, before the lock, misses

    def never(out: Path):
        raise AssertionError("built although the store held it")

    got, reused = b.get_or_build("demo", "k5", never)
    assert looks == ["k5"] and reused and Path(got.outputs["note"].path).read_text() == "from a"


def test_names_read_from_a_shared_store_cannot_leave_its_folders(tmp_path, monkeypatch):
    """Stage names and keys come back from run records, image ids from tables: each becomes a file
    name on the reading machine, so one that is not such a name is refused with one line."""
    from saec.artifacts.remote import ContentCache

    as_machine(monkeypatch, tmp_path / "a")
    store = Store(tmp_path / "store")
    assert store.stage_dir("predict_edge", "0123abcd").parent.name == "predict_edge"
    for stage, key in [("demo", "../../x"), ("demo", "/abs"), ("..", "k"), ("demo/sub", "k"), ("demo", "")]:
        with pytest.raises(StoreError, match="a run record that names it was altered"):
            store.lookup(stage, key)
    for sha in ["../../etc/passwd", "A" * 64, "a" * 63 + "/"]:
        with pytest.raises(ObjectStoreError, match="image_id column was altered"):
            ContentCache().path(sha, ".png")
    assert ContentCache().path("a" * 64, ".PNG").name == "a" * 64 + ".png"
    assert ContentCache().path("a" * 64, ".png/../../x").parent == ContentCache().path("a" * 64).parent  # suffix dropped
