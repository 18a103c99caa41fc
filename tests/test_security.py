"""Nothing a run reads back executes code: crafted Prefect result records are never read.

Prefect used to persist every stage's result as a cloudpickle record and to read it back as the
cache; a record crafted by anyone who can write to the store or to Prefect's folder then ran
code on the next run. Stages now keep no Prefect records: the store's JSON records are the cache.
This test plants such records, built with Prefect's own serializer, wherever Prefect looks for
results and under every name a stage could use, runs `saec prepare` twice, and checks that no
record was unpickled. It then unpickles one itself, to show the records are real attacks.
(Training checkpoints: tests/test_cloud_train.py; the trained edge model: tests/test_edge_train.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_concurrency import PREPARE, _finish, _start




class Planted:
    """Unpickling this creates the file `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_record(key: str, marker: Path) -> bytes:
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    meta = ResultRecordMetadata(storage_key=key, serializer=PickleSerializer(picklelib="cloudpickle"))
    return ResultRecord(metadata=meta, result=Planted(str(marker))).serialize()


@pytest.mark.slow
def test_crafted_prefect_result_records_are_never_read(tmp_path):
    store, home = tmp_path / "store", tmp_path / "home"
    marker = tmp_path / "code-ran"
    first = _start("prepare", PREPARE, store, home, tmp_path / "first.log")
    _finish([(first, tmp_path / "first.log")])
    run = json.loads(next(store.glob("runs/*/run.json")).read_text())
    names = {st["key"] for st in run["stages"].values()} | set(run["stages"])
    names |= {f"{task}-{key}" for task in ("synthesize-data", "scan-mvtec", "scan-ksdd2", "build-sft", "build-holdout",
                                           "build-ksdd2-1to1") for key in names}  # fmt: skip
    folders = [store / "prefect", home / ".prefect" / "storage"]  # where Prefect kept its records
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / name).write_bytes(crafted_record(name, marker))
    second = _start("prepare", PREPARE, store, home, tmp_path / "second.log")
    _finish([(second, tmp_path / "second.log")])
    assert not marker.exists()
    rerun = max((json.loads(p.read_text()) for p in store.glob("runs/*/run.json")), key=lambda r: r["started"] + r["run_id"])
    assert set(s["state"] for s in rerun["stages"].values()) == {"cached"}
    # the planted records are real: Prefect's own reader runs them
    from prefect.results import ResultRecord

    ResultRecord.deserialize(crafted_record("probe", marker))
    assert marker.exists()


def test_no_stage_task_caches_or_persists_through_prefect():
    """The structural side of the test above: every stage's Prefect task has caching and result records off."""
    from prefect.cache_policies import NO_CACHE

    import saec.flows.pipeline  # noqa: F401  (declares every stage)
    from saec.tasks.data import leakage_task
    from saec.tasks.stage import STAGES

    assert len(STAGES) >= 17
    for decl in STAGES.values():
        assert decl.task.cache_policy is NO_CACHE and decl.task.persist_result is False, decl
    assert leakage_task.cache_policy is NO_CACHE and leakage_task.persist_result is False
