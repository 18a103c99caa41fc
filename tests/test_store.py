"""The artifact store: declared schemas, atomic writes, stage folders that appear only when complete."""
from __future__ import annotations

import json
import os
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
    assert [p.name for p in (tmp_path / "stages" / "demo").iterdir()] == [".k1.lock"]  # the key's lock file only

    def ok(out):
        ref = write_table(pd.DataFrame([ROW]), "quarantine", out / "q.parquet")
        return {"q": out / "q.parquet"}, {"rows": ref.rows}

    result = store.build_stage("demo", "k1", ok)
    assert result.outputs["q"].rows == 1 and result.table("q").reason.tolist() == ["empty_file"]
    again = store.lookup("demo", "k1")
    assert again.outputs == result.outputs and again.digest() == result.digest()
    (store.stage_dir("demo", "k1") / "q.parquet").unlink()
    assert store.lookup("demo", "k1") is None  # an output with missing files is not an output


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
        files = {"q": out / "q.parquet", "summary": out / "summary.json", "sub": out / "sub"}
        return files, {"table": out / "q.parquet", "nested": [{"dir": str(out)}], "rows": ref.rows}

    result = store.build_stage("demo", "k2", build)
    final = store.stage_dir("demo", "k2")
    assert result.info["table"] == str(final / "q.parquet") and Path(result.info["table"]).is_file()
    assert result.info["nested"] == [{"dir": str(final)}] and result.info["rows"] == 1
    assert json.loads((final / "summary.json").read_text()) == {"table": str(final / "q.parquet")}
    assert store.lookup("demo", "k2").info == result.info
    # files below the top level are left as written (an adapter's identity hash covers them)
    assert ".building-" in json.loads((final / "sub" / "record.json").read_text())["here"]


# ------------------------------------------------------------------ concurrency, damage, leftovers


def _slow_build(root: str, log: str) -> str:
    """Build stage (demo, k) in another process; note each build in `log`; return the digest."""
    import os
    import time

    def build(out):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return {"q": write_table(pd.DataFrame([ROW]), "quarantine", out / "q.parquet").path}, {}

    return Store(root).build_stage("demo", "k", build).digest()


def test_concurrent_builders_of_one_key_build_it_once(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    log = tmp_path / "builds.log"
    with ProcessPoolExecutor(3) as pool:
        digests = list(pool.map(_slow_build, [str(tmp_path / "store")] * 3, [str(log)] * 3))
    assert len(set(digests)) == 1
    assert len(log.read_text().split()) == 1  # the others waited for the lock and reused the output
    assert [p.name for p in (tmp_path / "store" / "stages" / "demo").iterdir() if ".building-" in p.name] == []


def test_a_damaged_output_is_rebuilt_with_a_warning(tmp_path, caplog):
    store = Store(tmp_path)
    calls = []

    def build(out):
        calls.append(1)
        return {"q": write_table(pd.DataFrame([ROW] * 50), "quarantine", out / "q.parquet").path}, {}

    first = store.build_stage("demo", "k", build)
    table = Path(first.outputs["q"].path)
    table.write_bytes(table.read_bytes()[:-20])  # truncated
    assert store.lookup("demo", "k") is None
    assert "damaged" in caplog.text and "q.parquet" in caplog.text
    again = store.build_stage("demo", "k", build)
    assert len(calls) == 2 and again.digest() == first.digest() and len(again.table("q")) == 50
    same_size = bytearray(table.read_bytes())
    same_size[len(same_size) // 2] ^= 0xFF  # one byte changed, size kept: the content hash sees it
    table.write_bytes(bytes(same_size))
    assert store.lookup("demo", "k") is None


def test_a_build_must_declare_every_file_it_writes(tmp_path):
    from saec.artifacts.store import StoreError

    def sloppy(out):
        (out / "extra.txt").write_text("not declared")
        return {"q": write_table(pd.DataFrame([ROW]), "quarantine", out / "q.parquet").path}, {}

    with pytest.raises(StoreError, match="does not declare as outputs: extra.txt"):
        Store(tmp_path).build_stage("demo", "k", sloppy)
    assert not Store(tmp_path).stage_dir("demo", "k").exists()


def test_leftovers_of_dead_builders_are_removed_and_dead_runs_marked(tmp_path):
    store = Store(tmp_path)
    leftover = tmp_path / "stages" / "demo" / ".k.building-host-1-abc"
    leftover.mkdir(parents=True)
    (leftover / "half.parquet").write_bytes(b"PAR1")
    assert store.clear_leftovers() == 1 and not leftover.exists()
    run = store.new_run("pipeline")
    run.record.update(pid=2**22 + 7, pid_started=1.0)  # a process that is not there
    run.save()
    alive = store.new_run("pipeline")
    alive.save()  # this process: still running
    assert store.mark_interrupted() == [run.run_id]
    assert store.open_run(run.run_id).record["status"] == "interrupted"
    assert store.open_run(alive.run_id).record["status"] == "running"


def test_a_copied_store_serves_its_outputs_from_where_it_lies(tmp_path):
    import shutil

    store = Store(tmp_path / "a")
    built = store.build_stage("demo", "k", lambda out: ({"q": write_table(pd.DataFrame([ROW]), "quarantine", out / "q.parquet").path}, {}))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    copy = Store(tmp_path / "b").lookup("demo", "k")
    assert copy is not None and copy.digest() == built.digest()
    assert copy.path("q").is_relative_to(tmp_path / "b") and copy.table("q").reason.tolist() == ["empty_file"]


def test_store_files_get_the_usual_modes_not_owner_only(tmp_path):
    import stat

    from saec.artifacts.store import DIR_MODE, FILE_MODE, write_json_atomic

    old = os.umask(0o022)
    try:
        assert FILE_MODE == 0o666 & ~store_mod._UMASK
        def build(out):
            private = out / "lib" / "weights.bin"  # what a library saving through a private temporary file leaves
            private.parent.mkdir(mode=0o700)
            private.write_bytes(b"w")
            private.chmod(0o600)
            return {"q": write_table(pd.DataFrame([ROW]), "quarantine", out / "q.parquet").path,
                    "s": write_json_atomic(out / "s.json", {"a": 1}), "lib": out / "lib"}, {}

        built = Store(tmp_path).build_stage("demo", "k", build)
        folder = Path(built.dir)
        for f in (folder / "q.parquet", folder / "s.json", folder / "_stage.json", folder / "lib" / "weights.bin"):
            assert stat.S_IMODE(f.stat().st_mode) == FILE_MODE, f.name
        assert stat.S_IMODE((folder / "lib").stat().st_mode) == DIR_MODE
        assert stat.S_IMODE(folder.stat().st_mode) & 0o700 == 0o700
        assert DIR_MODE & 0o700 == 0o700
    finally:
        os.umask(old)


def test_an_input_that_cannot_be_read_is_not_blamed_on_the_store(tmp_path):
    from saec.artifacts.store import StoreError

    def reads_a_missing_input(out):
        (tmp_path / "dataset" / "gone.png").read_bytes()
        return {}, {}

    with pytest.raises(FileNotFoundError, match="gone.png"):  # the input's own error, not a store error
        Store(tmp_path / "store").build_stage("demo", "k", reads_a_missing_input)

    def disk_full(out):
        raise OSError(28, "No space left on device", str(out / "q.parquet"))

    with pytest.raises(StoreError, match="no space left on the device of the artifact store"):
        Store(tmp_path / "store").build_stage("demo", "k2", disk_full)
