"""The artifact store: declared schemas, atomic writes, stage folders that appear only when complete."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from saec.artifacts.hashing import sha256_file
from saec.artifacts.schemas import SchemaError
import saec.artifacts.store as store_mod
from saec.artifacts.store import Store, write_table

ROW = {
    "path": "/x.png", "rel_path": "x.png", "dataset": "mvtec_ad", "kind": "image",
    "reason": "empty_file", "detail": "",
}  # fmt: skip


def test_write_table_checks_schema_and_records_it(tmp_path):
    ref = write_table(pd.DataFrame([ROW]), "quarantine", tmp_path / "q.parquet")
    assert ref.rows == 1 and ref.sha256 == sha256_file(tmp_path / "q.parquet")
    assert pq.read_schema(tmp_path / "q.parquet").metadata[b"saec.schema"] == b"quarantine"
    with pytest.raises(SchemaError, match="lacks columns \\['detail'\\]"):
        write_table(pd.DataFrame([{k: v for k, v in ROW.items() if k != "detail"}]), "quarantine", tmp_path / "b.parquet")
    with pytest.raises(SchemaError, match="undeclared columns \\['extra'\\]"):
        write_table(pd.DataFrame([ROW | {"extra": 1}]), "quarantine", tmp_path / "c.parquet")
    with pytest.raises(SchemaError, match="no table schema named"):
        write_table(pd.DataFrame([ROW]), "nonesuch", tmp_path / "d.parquet")


def test_failed_table_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "q.parquet"
    write_table(pd.DataFrame([ROW]), "quarantine", path)
    before = path.read_bytes()

    def crash_midway(table, where, **kw):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.pq, "write_table", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_table(pd.DataFrame([ROW, ROW]), "quarantine", path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["q.parquet"]  # no temporary file left behind


def test_stage_folder_appears_only_when_complete(tmp_path):
    store = Store(tmp_path)

    def broken(out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        store.build_stage("demo", "k1", broken)
    assert not store.stage_dir("demo", "k1").exists()
    assert list((tmp_path / "stages" / "demo").iterdir()) == []

    def ok(out):
        ref = write_table(pd.DataFrame([ROW]), "quarantine", out / "q.parquet")
        return {"q": out / "q.parquet"}, {"rows": ref.rows}

    result = store.build_stage("demo", "k1", ok)
    assert result.outputs["q"].rows == 1 and result.table("q").reason.tolist() == ["empty_file"]
    again = store.load_stage("demo", "k1")
    assert again.outputs == result.outputs and again.digest() == result.digest()
    (store.stage_dir("demo", "k1") / "q.parquet").unlink()
    assert store.load_stage("demo", "k1") is None  # an output with missing files is not an output


def test_runs_are_listed(tmp_path):
    store = Store(tmp_path)
    run = store.new_run("prepare")
    run.finish("completed")
    (listed,) = store.runs()
    assert listed.run_id == run.run_id and listed.record["status"] == "completed"
    assert store.open_run(run.run_id).record["wall_s"] >= 0


def test_stage_info_names_the_published_folder_not_the_build_folder(tmp_path):
    store = Store(tmp_path)

    def build(out):
        ref = write_table(pd.DataFrame([ROW]), "quarantine", out / "q.parquet")
        (out / "summary.json").write_text(json.dumps({"table": str(out / "q.parquet")}))
        (out / "sub").mkdir()
        (out / "sub" / "record.json").write_text(json.dumps({"here": str(out)}))
        return {"q": out / "q.parquet"}, {"table": out / "q.parquet", "nested": [{"dir": str(out)}], "rows": ref.rows}

    result = store.build_stage("demo", "k2", build)
    final = store.stage_dir("demo", "k2")
    assert result.info["table"] == str(final / "q.parquet") and Path(result.info["table"]).is_file()
    assert result.info["nested"] == [{"dir": str(final)}] and result.info["rows"] == 1
    assert json.loads((final / "summary.json").read_text()) == {"table": str(final / "q.parquet")}
    assert store.load_stage("demo", "k2").info == result.info
    # files below the top level are left as written (an adapter's identity hash covers them)
    assert ".building-" in json.loads((final / "sub" / "record.json").read_text())["here"]
