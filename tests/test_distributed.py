"""The distributed mode with nothing shared but the object store and the Prefect API.

One host plays five machines: a Prefect server on PostgreSQL, two `edge` workers, one `cloud`
worker and the machine that starts the run, each a process tree with its own HOME, SAEC_HOME
(its copy of the store, its content cache) and working folder. The artifact store is an S3
bucket on a real S3 API server (moto's). The run splits SAEC's edge stage in two; one edge
worker is killed, with the stage run it was executing, in the middle of its shard: the run
still finishes, the shard having been run again on the other edge worker, and its decisions are
those of a one-machine run of the same configuration.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from conftest import SMALL_PIPELINE
from servers import PostgresServer, PrefectServer, S3Server

ROOT = Path(__file__).resolve().parents[1]
CONFIG = [*SMALL_PIPELINE, "evaluate.systems=[saec]"]
DEADLINE_S = 480  # the distributed run, start to end, with a worker lost, on a busy two-core machine
# what decides: the columns of the decisions table less where the files lay on the machine that prepared the data
DECISION_COLUMNS = ["image_id", "category", "defect_type", "label", "pred", "correct", "branch", "reason", "score", "system"]


class Machine:
    """A process (tree) with a home of its own; shares only the environment handed to it."""

    def __init__(self, tmp: Path, name: str, env: dict[str, str]):
        self.name = name
        self.home = tmp / name
        (self.home / "work").mkdir(parents=True)
        self.env = {**env, "HOME": str(self.home), "SAEC_HOME": str(self.home / "saec"),
                    "PREFECT_HOME": str(self.home / "prefect"), "XDG_CACHE_HOME": str(self.home / "cache")}  # fmt: skip
        self.log = self.home / "out.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> subprocess.Popen:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-P", "-m", *args], cwd=self.home / "work", env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return self.proc

    def run(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run([sys.executable, "-P", "-m", *args], cwd=self.home / "work", env=self.env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert done.returncode == 0, f"{self.name}: {args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def pids(self) -> set[int]:
        if self.proc is None:
            return set()
        try:
            root = psutil.Process(self.proc.pid)
            return {root.pid, *(c.pid for c in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def kill(self) -> None:
        """SIGKILL the process and everything it started (its stage runs too): the machine is gone."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        procs = [psutil.Process(p) for p in self.pids() if psutil.pid_exists(p)]
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=30)


def _decisions(url: str, env: dict[str, str], home: Path) -> tuple[str, pd.DataFrame, dict]:
    """(hash, table, run record) of SAEC's decisions in the latest pipeline run of the store at `url`,
    read as yet another machine would: through its own copy of the store."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env | {"SAEC_HOME": str(home)})
    try:
        from saec.artifacts.store import Store

        store = Store(url)
        runs = [r for r in store.runs() if r.flow == "pipeline" and r.record.get("status") == "completed"]
        assert runs, f"no completed pipeline run in {url}"
        run = max(runs, key=lambda r: r.record["started"])
        entry = run.record["stages"]["mvtec_holdout/merge"]
        merged = store.lookup(Path(entry["dir"]).parent.name, entry["key"])
        assert merged is not None, f"the decisions of run {run.run_id} are not in {url}"
        table = merged.table("decisions")[DECISION_COLUMNS].sort_values("image_id", ignore_index=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    digest = hashlib.sha256(pd.util.hash_pandas_object(table, index=False).values.tobytes()).hexdigest()
    return digest, table, run.record


class ShardWatcher(threading.Thread):
    """Watches the edge pool's stage runs over the API; kills the edge worker executing the first
    shard of SAEC's edge stage once that shard is running. Records which worker ran which stage run."""

    def __init__(self, api: str, workers: list[Machine]):
        super().__init__(daemon=True)
        self.api, self.workers = api, workers
        self.seen: dict[str, dict] = {}  # flow run id -> name, worker, final state
        self.killed: tuple[str, str] | None = None  # (worker, flow run id)
        self.done = threading.Event()

    def _owner(self, run) -> str | None:
        pid = str(run.infrastructure_pid or "").rpartition(":")[2]
        if not pid.isdigit():
            return None
        return next((w.name for w in self.workers if int(pid) in w.pids()), None)

    def run(self) -> None:
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        with SyncPrefectClient(self.api) as client:
            while not self.done.is_set():
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="predict-edge")))
                for r in runs:
                    entry = self.seen.setdefault(str(r.id), {"name": r.name, "worker": None, "state": None})
                    entry["state"] = r.state_name
                    if entry["worker"] is None and r.state is not None and r.state.is_running():
                        entry["worker"] = self._owner(r)
                    if self.killed is None and entry["worker"] and r.state is not None and r.state.is_running() \
                            and "#1of2" in r.name:  # fmt: skip
                        victim = next(w for w in self.workers if w.name == entry["worker"])
                        victim.kill()
                        self.killed = (victim.name, str(r.id))
                time.sleep(0.25)


@pytest.mark.slow
def test_two_edge_workers_and_a_cloud_worker_share_only_the_store_and_the_api(tmp_path):
    machines: list[Machine] = []
    with S3Server(log=tmp_path / "moto.log") as s3, PostgresServer(tmp_path / "pg") as pg:
        server = PrefectServer(tmp_path / "server", pg.url).start()
        try:
            base = {k: v for k, v in server.env().items() if not k.startswith(("AWS_", "SAEC_", "PREFECT_HOME"))}
            base.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # only the server talks to the database
            base.update(s3.env(), PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_LOGGING_LEVEL="WARNING")
            operator = Machine(tmp_path, "operator", base)
            operator.run("saec.cli", "deploy", "apply", timeout=300)
            edge = [Machine(tmp_path, f"edge-{x}", base) for x in "ab"]
            cloud = Machine(tmp_path, "cloud", base)
            machines = [*edge, cloud]
            for m in edge:  # one stage run at a time each: two shards go to two machines
                m.start("prefect", "worker", "start", "--pool", "edge", "--type", "process", "--limit", "1", "--name", m.name)
            cloud.start("prefect", "worker", "start", "--pool", "cloud", "--type", "process", "--name", "cloud")

            # the reference: the same configuration on one machine, at the same time (the distributed
            # run spends a minute waiting for the stage watch)
            single = Machine(tmp_path, "single", base)
            machines.append(single)
            reference = single.start("saec.cli", "run", *(f"--set={o}" for o in CONFIG),
                                     f"--set=store.root=s3://{s3.bucket}/single")  # fmt: skip

            watcher = ShardWatcher(server.api_url, edge)
            watcher.start()
            parent = Machine(tmp_path, "parent", base)
            machines.append(parent)
            proc = parent.start("saec.cli", "run", "--distributed", "--edge-shards", "2", *(f"--set={o}" for o in CONFIG),
                                f"--set=store.root=s3://{s3.bucket}/dist")  # fmt: skip
            try:
                proc.wait(timeout=DEADLINE_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the distributed run did not finish in {DEADLINE_S} s:\n{parent.tail()}\n"
                            + "\n".join(f"--- {m.name}\n{m.tail(1500)}" for m in machines))  # fmt: skip
            finally:
                watcher.done.set()
                watcher.join(timeout=10)
            assert proc.returncode == 0, f"the distributed run failed:\n{parent.tail()}\n" + "\n".join(
                f"--- {m.name}\n{m.tail(1500)}" for m in machines)
            assert reference.wait(timeout=DEADLINE_S) == 0, f"the one-machine run failed:\n{single.tail()}"

            # one edge worker was killed during its shard; the shard ran again on the other one
            assert watcher.killed is not None, f"no shard was seen running to kill its worker: {watcher.seen}"
            dead, lost_run = watcher.killed
            alive = next(m.name for m in edge if m.name != dead)
            assert watcher.seen[lost_run]["state"] == "Crashed"  # marked so by the stage watch, 60 s without a heartbeat
            done = [e for e in watcher.seen.values() if e["state"] == "Completed"]
            assert sorted(e["name"].split("#")[1].split()[0] for e in done) == ["1of2", "2of2"]
            assert any("(attempt 2)" in e["name"] for e in done)  # the lost shard, sent again

            ref_hash, ref, _ = _decisions(f"s3://{s3.bucket}/single", s3.env(), tmp_path / "checker" / "a")
            got_hash, got, record = _decisions(f"s3://{s3.bucket}/dist", s3.env(), tmp_path / "checker" / "b")
            pd.testing.assert_frame_equal(got, ref)
            assert got_hash == ref_hash

            # the run record says which stage ran where: both shards, on the edge workers' own copies
            sent = record["dispatched"]
            shard_runs = [s for s in sent if s["stage"] == "predict-edge"]
            assert len(shard_runs) == 2, sent
            mirrors = {s["mirror"] for s in shard_runs}
            assert all(m.startswith(str(tmp_path / alive)) for m in mirrors), (mirrors, alive)
            assert {s["stage"] for s in sent if s["mirror"].startswith(str(tmp_path / "cloud"))} >= {"train-cloud", "score-cloud"}
            assert not any(s["mirror"].startswith(str(tmp_path / "parent")) for s in sent)
        finally:
            for m in machines:
                m.stop()
            server.stop()
