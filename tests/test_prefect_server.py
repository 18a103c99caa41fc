"""SAEC operated through a real `prefect server`: work pools, workers, deployments, resume, drift.

The integration test starts its own server (SQLite in a temporary PREFECT_HOME, analytics
off) on a free port, an `edge` and a `cloud` process worker, applies the deployments with
`saec deploy apply`, and drives them as an operator would:

1. `saec-pipeline/in-process` on a small embedded default: completed, its artifacts and its
   Parquet outputs read back through the API; this is the uninterrupted reference.
2. `saec-pipeline/distributed` from an empty store at the same path, with a one-shot fault
   before `train-cloud`: the run fails there; `prefect flow-run retry` resumes it, every
   stage before the fault comes from the cache, the edge and cloud stages ran on their pools,
   and the decisions are identical to the reference's.
3. `saec-evaluate/nightly` twice: the second run's `drift-<dataset>` artifact compares its
   metrics with the first's.

Every process it starts (server, workers, their flow runs) is stopped at the end, also
when the test fails. The session's `prefect_test_harness` is not touched: the API URL is
set only in the processes and the client made here.

The other tests here are fast checks of the pieces: parameters over the wire, one-shot faults.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
from conftest import SMALL_PIPELINE  # noqa: E402

SMALL = [*SMALL_PIPELINE, "evaluate.systems=[saec]"]
RUN_DEADLINE_S = 420  # one flow run, start to end, on a busy two-core machine
FAST_REMOTE = {"poll_interval_s": 1.0, "start_timeout_s": 240}

# tables whose bytes are a pure function of the inputs (no timings, no file dates inside)
SAME_BYTES = ["holdout:manifest", "mvtec_holdout/complexity:complexity", "mvtec_holdout/routing:routing",
              "mvtec_holdout/merge:decisions", "mvtec_holdout/report:decisions"]  # fmt: skip
# tables that also carry timings or a weights-file hash: compare what they decide
SAME_VALUES = {
    "mvtec_holdout/saec_edge:predictions": ["image_id", "p_defect", "smax", "margin", "entropy", "verdict"],
    "mvtec_holdout/saec_cloud_quota:scores": ["image_id", "p_defect", "logit_0", "logit_1"],
    "mvtec_holdout/saec_cloud_unsure:scores": ["image_id", "p_defect", "logit_0", "logit_1"],
}
BEFORE_FAULT = {"synthetic", "scan_mvtec", "scan_ksdd2", "sft", "holdout", "ksdd2_1to1", "train_edge"}


# ------------------------------------------------------------------ fast checks of the pieces


def test_stage_parameters_survive_the_wire_with_the_same_cache_key(tmp_path):
    """What the parent sends is what the stage worker computes the cache key from."""
    from saec.artifacts.store import Store
    from saec.config import load_config
    from saec.flows.remote import decode_params, encode_params
    from saec.tasks.cloud.task import score_cloud
    from saec.tasks.stage import ModelRef, stage_of

    cfg = load_config(None, [f"store.root={tmp_path}"])
    images = Store(tmp_path).build_stage("quota", "k1", lambda out: ({"m": _write(out / "m.txt", "x")}, {"n": 1}))
    params = dict(store=str(tmp_path), images=images, table="cloud_manifest",
                  model=ModelRef(kind="vlm", path="/m", sha256="a" * 64), adapter=None,
                  cfg=cfg.cloud.score_config("/m").model_copy(update={"threshold": 0.4}), telemetry=cfg.telemetry, label="saec")  # fmt: skip
    wire = json.loads(json.dumps(encode_params(score_cloud, params)))
    back = decode_params(score_cloud, wire)
    assert type(back["images"]).__name__ == "StageResult" and back["images"].digest() == images.digest()
    assert back["cfg"] == params["cfg"] and back["adapter"] is None
    assert stage_of(score_cloud).key(back) == stage_of(score_cloud).key(params)
    with pytest.raises(TypeError, match="no parameter"):
        encode_params(score_cloud, {**params, "bogus": 1})


def test_remote_config_is_checked_at_the_door():
    from pydantic import ValidationError

    from saec.flows.remote import RemoteConfig

    assert RemoteConfig().cloud_deployment == "run-stage/cloud"
    with pytest.raises(ValidationError, match="unknown stage"):
        RemoteConfig(edge_stages=["train-edge", "route-by-confidence"])
    with pytest.raises(ValidationError, match="both the edge and the cloud"):
        RemoteConfig(edge_stages=["score-cloud"])
    with pytest.raises(ValidationError, match="flow name"):
        RemoteConfig(cloud_deployment="cloud")


def test_a_one_shot_fault_fires_once_per_flow_run(tmp_path):
    from saec.artifacts.store import Store
    from saec.flows.common import InjectedFailure, check_fault
    from saec.tasks.cloud.task import train_cloud
    from saec.tasks.edge.task import train_edge_task

    run = Store(tmp_path).new_run("pipeline")
    run.record["fail_before"] = ["once:train-cloud", "mvtec_holdout/merge"]
    check_fault(run, train_edge_task, None)  # not named: passes
    with pytest.raises(InjectedFailure, match="one-shot"):
        check_fault(run, train_cloud, None)
    check_fault(run, train_cloud, None)  # the retry of the same run passes
    assert len(list((tmp_path / "faults").rglob("train-cloud"))) == 1
    with pytest.raises(InjectedFailure, match="'mvtec_holdout/merge'"):  # a plain name fails every time
        check_fault(run, train_edge_task, "mvtec_holdout/merge")
    other = Store(tmp_path).new_run("pipeline")  # another run (outside Prefect: another run folder) fails again
    other.record["fail_before"] = ["once:train-cloud"]
    with pytest.raises(InjectedFailure):
        check_fault(other, train_cloud, None)


def test_deployments_file_declares_both_pools_and_a_nightly_schedule():
    from saec.deployments.deploy import deployment_names, load_spec, work_pool_names

    spec = load_spec()
    assert work_pool_names(spec) == ["cloud", "edge"]
    names = deployment_names(spec)
    assert {"saec-pipeline/in-process", "saec-pipeline/distributed", "saec-evaluate/on-demand",
            "saec-evaluate/nightly", "run-stage/edge", "run-stage/cloud"} == set(names)  # fmt: skip
    by_name = dict(zip(names, spec["deployments"]))
    assert by_name["saec-evaluate/nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    assert by_name["run-stage/edge"]["work_pool"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert by_name["saec-pipeline/distributed"]["parameters"]["distributed"] is True


def test_stage_runs_send_heartbeats_and_a_silent_one_is_marked_crashed():
    from prefect.client.schemas.objects import StateType

    from saec.deployments.deploy import HEARTBEAT_ENV, SpecError, heartbeat_periods, load_spec, stage_watch

    assert heartbeat_periods(load_spec()) == {"run-stage/edge": 30, "run-stage/cloud": 30}
    watch = stage_watch(["d1", "d2"], 30)
    trigger, action = watch.trigger, watch.actions[0]
    assert trigger.posture == "Proactive" and trigger.threshold == 1 and trigger.within.total_seconds() == 60
    assert {"prefect.flow-run.Pending", "prefect.flow-run.heartbeat", "prefect.flow-run.Running"} == trigger.after
    assert {f"prefect.flow-run.{e}" for e in ("heartbeat", "Running", "Completed", "Failed", "Crashed", "Cancelled")} <= trigger.expect
    assert trigger.match_related.model_dump()["prefect.resource.id"] == ["prefect.deployment.d1", "prefect.deployment.d2"]
    assert action.state == StateType.CRASHED and not action.force  # a run that has ended keeps its state
    too_often = {"name": "x", "entrypoint": "m:f", "work_pool": {"name": "edge", "job_variables": {"env": {HEARTBEAT_ENV: "10"}}}}
    with pytest.raises(SpecError, match="at least 30"):
        heartbeat_periods({"deployments": [too_often]})


def test_only_a_crashed_stage_run_is_sent_again_and_only_so_often(monkeypatch, tmp_path, caplog):
    """A crash (the worker or its machine died) sends the stage again, up to `attempts` flow runs;
    a stage that failed (an exception in the stage) or was cancelled is not sent again."""
    from types import SimpleNamespace

    from prefect.states import Cancelled, Completed, Crashed, Failed

    import saec.flows.remote as remote
    from saec.tasks.edge.task import train_edge_task

    assert remote.resend_reason(Crashed(message="no heartbeat for 60 s")) == "crashed (no heartbeat for 60 s)"
    for final in (Completed(), Failed(message="ValueError: bad input"), Cancelled(message="timed out")):
        assert remote.resend_reason(final) is None

    class Decl:  # the stage's declaration, as far as the parent uses it after a completed run
        code = "c"

        def key(self, params):
            return "k"

        def lookup(self, store, params):
            return "the stored output"

    monkeypatch.setattr(remote, "stage_of", lambda task: Decl())
    monkeypatch.setattr(remote, "warn_if_unwatched", lambda log: None)

    def dispatch(*states):
        sent = []

        def send(self, task, deployment, params, name, attempt):
            sent.append(name)
            return SimpleNamespace(id=f"run-{len(sent)}", name=name), states[len(sent) - 1]

        monkeypatch.setattr(remote.RemoteStages, "_send", send)
        stages = remote.RemoteStages(remote.RemoteConfig(attempts=3))
        try:
            return sent, stages._dispatch(train_edge_task, {"store": str(tmp_path), "label": "x"}), stages.dispatched
        except remote.RemoteStageError as exc:
            return sent, exc, stages.dispatched
        finally:
            stages.close()

    from saec.artifacts.store import Store

    Store(tmp_path).write_doc(remote.dispatch_record("run-2"),
                              {"stage": "train-edge", "key": "k", "code": "c", "cached": False, "host": "h2"})
    with caplog.at_level("INFO"):
        sent, out, dispatched = dispatch(Crashed(message="no heartbeat for 60 s"), Completed())
    assert sent == ["train-edge x", "train-edge x (attempt 2)"] and out == ("the stored output", False)
    assert [d["flow_run"] for d in dispatched] == ["run-2"]
    assert "flow run train-edge x (run-1) crashed (no heartbeat for 60 s); sending the stage again" in caplog.text

    sent, err, _ = dispatch(Crashed(message="gone"), Failed(message="ValueError: bad input"), Completed())
    assert len(sent) == 2 and "ended Failed: ValueError: bad input" in str(err)  # the stage's own failure is final
    sent, err, _ = dispatch(Cancelled(message="timed out"))
    assert len(sent) == 1 and "ended Cancelled" in str(err)
    sent, err, _ = dispatch(*[Crashed(message="gone")] * 4)
    assert len(sent) == 3 and "attempt 3 of 3; every one crashed" in str(err)


# ------------------------------------------------------------------ the server, its workers, cleanup


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A Prefect server and workers in subprocesses, with an environment of their own."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({
            "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
            "SAEC_HOME": str(tmp / "saec-home"), "PYTHONUNBUFFERED": "1",
        })  # fmt: skip
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text()[-tail:] if path.exists() else ""

    def wait_healthy(self, timeout: float = 120) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.procs["server"].poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{self.log('server')}")
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout} s:\n{self.log('server')}")

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def stop(self) -> list[int]:
        """Stop every process started here and everything they started; return the pids still alive."""
        import psutil

        tree: list[psutil.Process] = []
        for name in sorted(self.procs, key=lambda n: n == "server"):  # workers (and their flow runs) first
            try:
                root = psutil.Process(self.procs[name].pid)
                tree += [*root.children(recursive=True), root]
            except psutil.NoSuchProcess:
                pass
        for p in tree:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for proc in self.procs.values():  # anything left in their sessions
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=10)
        return [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    try:
        s.start("server", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(s.port))
        s.wait_healthy()
        s.cli("saec.cli", "deploy", "apply")
        for pool in ("edge", "cloud"):
            s.start(f"worker-{pool}", "prefect", "worker", "start", "--pool", pool, "--type", "process")
        yield s
    finally:
        leaked = s.stop()
    assert not leaked, f"processes left running: {leaked}"


# ------------------------------------------------------------------ helpers over the API


def _client(stack: Stack):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(stack.api)


def _trigger(stack: Stack, deployment: str, **parameters):
    with _client(stack) as client:
        dep = client.read_deployment_by_name(deployment)
        return client.create_flow_run_from_deployment(dep.id, parameters=parameters).id


def _wait(stack: Stack, flow_run_id, timeout: float = RUN_DEADLINE_S):
    t0 = time.monotonic()
    with _client(stack) as client:
        while time.monotonic() - t0 < timeout:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(2)
    logs = "\n".join(f"--- {n}\n{stack.log(n)}" for n in ("worker-edge", "worker-cloud"))
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout} s (state {run.state_name}):\n{logs}")


def _descendants(client, root_id) -> list:
    """Every flow run below `root_id` (subflows, and stage runs sent to the pools)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found, frontier = [], [root_id]
    while frontier:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
        found += children
        frontier = [c.id for c in children]
    return found


def _latest_artifact(client, key: str, flow_run_ids: set):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                                flow_run_id=ArtifactFilterFlowRunId(any_=list(flow_run_ids))))  # fmt: skip
    assert arts, f"no artifact {key!r} from flow runs {flow_run_ids}"
    return max(arts, key=lambda a: a.created)


def _table_path(record: dict, table: str) -> Path:
    stage, _, output = table.rpartition(":")
    return Path(record["stages"][stage]["outputs"][output]["path"])


def _fingerprints(record: dict) -> dict[str, str]:
    out = {t: hashlib.sha256(_table_path(record, t).read_bytes()).hexdigest() for t in SAME_BYTES}
    for t, cols in SAME_VALUES.items():
        df = pd.read_parquet(_table_path(record, t), columns=cols).sort_values("image_id", ignore_index=True)
        out[t] = hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()
    return out


def _run_record(summary: dict) -> dict:
    return json.loads((Path(summary["run_dir"]) / "run.json").read_text())


def _summary(store: Path, flow_run_id) -> dict:
    """What a deployment run did, from the run records it left in the store (Prefect keeps no results).

    The latest record whose Prefect flow run (or the deployment run above it) is `flow_run_id`;
    a retried run writes a new record on each attempt.
    """
    records = [json.loads(p.read_text()) for p in store.glob("runs/*/run.json")]
    mine = [r for r in records if str(flow_run_id) in (str(r.get("root_flow_run_id")), str(r.get("flow_run_id")))]
    assert mine, f"no run record of flow run {flow_run_id} in {store}"
    rec = max(mine, key=lambda r: (r["started"], r["run_id"]))
    return {"run_id": rec["run_id"], "run_dir": str(store / "runs" / rec["run_id"]), "status": rec["status"],
            "stages": {n: st["state"] for n, st in rec["stages"].items()}, "record": rec}  # fmt: skip


# ------------------------------------------------------------------ the integration test


@pytest.mark.slow
def test_deployments_on_two_work_pools_resume_a_failed_run_and_flag_drift(stack, tmp_path):
    from saec.config import load_config
    from saec.flows.evaluate import artifact_key, artifact_tag

    store = tmp_path / "store"
    base = [*SMALL, f"store.root={store}"]
    with _client(stack) as client:
        pools = {p: client.read_work_pool(p) for p in ("edge", "cloud")}
        assert {p.type for p in pools.values()} == {"process"}
        assert "saec deploy worker --pool edge" in pools["edge"].description  # what the pool is for, in the UI
        assert "GPU" in pools["cloud"].description
        nightly = client.read_deployment_by_name("saec-evaluate/nightly")
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]

    # 1. the uninterrupted reference, in one process on the cloud pool
    ref_id = _trigger(stack, "saec-pipeline/in-process", overrides=base)
    ref = _wait(stack, ref_id)
    assert ref.state.is_completed(), ref.state.message
    summary = _summary(store, ref_id)
    record = summary["record"]
    assert record["deployment"] == "in-process" and record["root_flow_run_id"] == str(ref_id)
    assert record["status"] == "completed" and set(summary["stages"].values()) == {"ran"}
    metrics = pd.read_parquet(_table_path(record, "mvtec_holdout/report:metrics"))
    assert list(metrics.system) == ["saec"] and metrics.n.iloc[0] == record["stages"]["holdout"]["outputs"]["manifest"]["rows"]
    with _client(stack) as client:
        tree = {ref_id, *(r.id for r in _descendants(client, ref_id))}
        cfg = load_config(None, base)
        table = _latest_artifact(client, artifact_key(cfg, "mvtec_holdout", "metrics"), tree)
        report = _latest_artifact(client, artifact_key(cfg, "mvtec_holdout", "report"), tree)
        overview = _latest_artifact(client, f"summary-{artifact_tag(cfg)}", {ref_id})  # on the deployment's own run
        names = {client.read_flow_run(r).name for r in tree}
    # every flow run named for what it does; the pipeline's carry the tag of their artifacts' keys
    tag = artifact_tag(cfg)
    assert {f"saec-pipeline mvtec_holdout [{tag}]", f"pipeline mvtec_holdout [{tag}]", "evaluate mvtec_holdout"} <= names
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows[0]["system"] == "SAEC" and rows[0]["accuracy %"] == f"{100 * metrics.accuracy.iloc[0]:.1f}"
    assert "## mvtec_holdout" in overview.data
    assert "saec" in report.data and str(_table_path(record, "mvtec_holdout/report:figure")) in report.data
    reference = _fingerprints(record)
    # `saec run` on the store the deployment run filled: every stage reused, and SAEC's wall time is
    # the one the deployment run measured, naming that run (not a near-zero time over stored work)
    args = [a for item in base for a in ("--set", item)]
    stack.cli("saec.cli", "run", *args)
    cli_run = max((json.loads(p.read_text()) for p in store.glob("runs/*/run.json")), key=lambda r: (r["started"], r["run_id"]))
    assert cli_run["run_id"] != record["run_id"] and {st["state"] for st in cli_run["stages"].values()} == {"cached"}
    notes = cli_run["stages"]["mvtec_holdout/report"]["info"]["notes"]
    assert any(f"(executed, run {record['run_id']})" in n for n in notes), notes
    store.rename(tmp_path / "store-reference")  # the resumed run starts from nothing, at the same path

    # 2. distributed, failing once before train-cloud; retried with `prefect flow-run retry`
    failing = [*base, "faults.fail_before=[once:train-cloud]"]
    run_id = _trigger(stack, "saec-pipeline/distributed", overrides=failing, remote=FAST_REMOTE)
    first = _wait(stack, run_id)
    assert first.state.is_failed() and "one-shot failure before stage 'train-cloud'" in first.state.message
    failed = [json.loads(p.read_text()) for p in (store / "runs").glob("*/run.json")]
    assert [r["status"] for r in failed] == ["failed"] and BEFORE_FAULT == set(failed[0]["stages"])

    stack.cli("prefect", "flow-run", "retry", str(run_id))
    second = _wait(stack, run_id)
    assert second.state.is_completed(), second.state.message
    assert second.run_count == 2
    resumed = _summary(store, run_id)["record"]
    states = {name: st["state"] for name, st in resumed["stages"].items()}
    assert {n for n, s in states.items() if s == "cached"} == BEFORE_FAULT
    assert {n for n, s in states.items() if s == "ran"} == set(states) - BEFORE_FAULT
    # the retry sent only what had to compute; train-edge came from the cache in the parent
    sent = {d["stage"]: d["deployment"] for d in resumed["dispatched"]}
    assert sent == {"train-cloud": "run-stage/cloud", "predict-edge": "run-stage/edge", "score-cloud": "run-stage/cloud"}
    assert not any(d["cached"] for d in resumed["dispatched"])
    with _client(stack) as client:
        stage_runs = [r for r in _descendants(client, run_id) if r.deployment_id is not None]
        pools_used = {r.name.split(" ")[0]: r.work_pool_name for r in stage_runs if r.state.is_completed()}
    # each stage run is named for its stage and, where it has one, its set and system
    assert {"score-cloud mvtec_holdout/saec_cloud_quota", "predict-edge mvtec_holdout/saec_edge"} <= {r.name for r in stage_runs}
    assert pools_used["train-edge"] == "edge" and pools_used["predict-edge"] == "edge"
    assert pools_used["train-cloud"] == "cloud"
    assert pools_used["score-cloud"] == "cloud"
    assert _fingerprints(resumed) == reference  # identical to the uninterrupted run

    # 3. the nightly re-evaluation, twice; the second compares with the first
    drift = {"max_accuracy_drop": 0.0, "max_cloud_share_shift": 0.0}
    # (distributed: cached stages, submitted or called, are served in the parent; the rest go to the pools)
    nightly = dict(drift=drift, distributed=True, remote=FAST_REMOTE)
    night1 = _wait(stack, _trigger(stack, "saec-evaluate/nightly", overrides=base, **nightly))
    assert night1.state.is_completed(), night1.state.message
    out1s = _summary(store, night1.id)
    out1 = out1s["record"]
    assert out1["models_from"] == resumed["run_id"] and out1["deployment"] == "saec-evaluate/nightly"
    assert out1["drift"]["mvtec_holdout"]["previous_run"] is None
    assert set(out1s["stages"].values()) == {"cached"} and out1["dispatched"] == []
    night2_id = _trigger(stack, "saec-evaluate/nightly", overrides=[*base, "routing.cloud_thr=0.9"], **nightly)
    night2 = _wait(stack, night2_id)
    assert night2.state.is_completed(), night2.state.message
    out2s = _summary(store, night2_id)
    out2 = out2s["record"]
    assert out2["drift"]["mvtec_holdout"]["previous_run"] == out1["run_id"]
    ran = {n for n, s in out2s["stages"].items() if s == "ran"}
    assert {"mvtec_holdout/merge", "mvtec_holdout/report"} <= ran
    assert {d["stage"] for d in out2["dispatched"]} == ({"score-cloud"} if ran & {"mvtec_holdout/saec_cloud_quota"} else set())
    table = pd.read_parquet(out2["drift"]["mvtec_holdout"]["table"]).set_index("metric")
    before, after = (o["stages"]["mvtec_holdout/report"]["info"]["systems"][0] for o in (out1, out2))
    for metric in ("accuracy", "balanced_accuracy", "cloud_share"):
        assert table.loc[metric, "previous"] == pytest.approx(before[metric])
        assert table.loc[metric, "current"] == pytest.approx(after[metric])
    acc_drop = before["accuracy"] - after["accuracy"]
    assert bool(table.loc["accuracy", "drifted"]) == (acc_drop > 1e-12)
    with _client(stack) as client:
        art = _latest_artifact(client, "drift-mvtec-holdout", {night2_id, *(r.id for r in _descendants(client, night2_id))})
    assert out1["run_id"] in art.data and out2["run_id"] in art.data
    findings = out2["drift"]["mvtec_holdout"]["findings"]
    assert art.description == "drift on mvtec_holdout: " + ("; ".join(findings) or "none")
    assert len(findings) == int(table.drifted.sum())
