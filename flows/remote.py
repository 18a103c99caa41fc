"""The pipeline as deployments run it: in one process, or with its edge and cloud stages on their own machines.

`saec-pipeline` is the deployed entry point. With `distributed=False` it runs the same
`pipeline` flow as `saec run`. With `distributed=True` the edge stages (train and run the
YOLO classifier) go to the `run-stage/edge` deployment, served by workers of the `edge`
work pool (CPU machines), and the cloud stages (build, train and run the VLM) go to
`run-stage/cloud`, served by the `cloud` pool (GPU machines). Everything else, and the
decisions of what runs when, stays in the parent flow.

The parent and the stage runs exchange references only: the parent sends a stage's
parameters (paths and content hashes into the artifact store) and, once the stage run has
completed, reads the stage's output from the store under the cache key it computed itself,
verified like any cache hit. So every machine must reach one store: an object store URL
(`s3://...`: each machine fetches the stage outputs it is sent into its own copy, `localize`),
or one folder at the same absolute path everywhere (one machine, or an NFS mount), and run the
same code: a worker with other code builds under another key, and the parent says so.

A stage whose output the store already holds is taken from there in the parent and is not
sent anywhere; only stages that must compute are dispatched.
"""
from __future__ import annotations

import contextvars
import socket
import time
import typing
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import Task, flow
from prefect.states import Completed, Failed, Pending, State
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from pydantic_core import to_jsonable_python

from saec.env import configure_offline

configure_offline()

from saec.artifacts.store import ModelRef, RunFolder, StageResult, Store  # noqa: E402
from saec.config import PipelineConfig, load_config  # noqa: E402
from saec.flows.common import cached_result, placed, run_here, run_name  # noqa: E402
from saec.flows.evaluate import publish_summary  # noqa: E402
from saec.flows.pipeline import pipeline_flow  # noqa: E402
from saec.flows.prepare import run_logger  # noqa: E402
from saec.tasks.cloud.task import score_cloud, tiny_llava_task, tiny_vlm_task, train_cloud  # noqa: E402
from saec.tasks.edge.task import predict_edge_task, train_edge_task  # noqa: E402
from saec.tasks.stage import stage_of  # noqa: E402
from saec.errors import ActionableError  # noqa: E402

EDGE_TASKS: tuple[Task, ...] = (train_edge_task, predict_edge_task)
CLOUD_TASKS: tuple[Task, ...] = (tiny_vlm_task, tiny_llava_task, train_cloud, score_cloud)
STAGE_TASKS: dict[str, Task] = {t.name: t for t in (*EDGE_TASKS, *CLOUD_TASKS)}


class RemoteStageError(ActionableError, RuntimeError):
    """A dispatched stage did not complete, or its outputs are not visible to the parent."""


class RemoteConfig(BaseModel):
    """Where the edge and cloud stages of a distributed run go, and how long to wait for them."""

    model_config = ConfigDict(extra="forbid")
    edge_deployment: str = Field("run-stage/edge", description="deployment that runs edge stages (flow/deployment)")
    cloud_deployment: str = Field("run-stage/cloud", description="deployment that runs cloud stages")
    edge_stages: list[str] = Field(default_factory=lambda: [t.name for t in EDGE_TASKS])
    cloud_stages: list[str] = Field(default_factory=lambda: [t.name for t in CLOUD_TASKS])
    poll_interval_s: float = Field(2.0, gt=0, description="how often the parent asks for a stage run's state")
    start_timeout_s: float = Field(600.0, gt=0, description="fail if no worker picks a stage run up within this")
    timeout_s: float | None = Field(None, gt=0, description="fail if a stage run takes longer (None: no limit)")
    edge_shards: int = Field(1, ge=1, description="edge prediction runs as this many shards, side by side on the edge "
                             "pool's workers, merged in the parent (training is not sharded)")
    attempts: int = Field(3, ge=1, description="flow runs a stage gets when its runs crash (worker or machine died); "
                                               "a stage that fails is not sent again")  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> "RemoteConfig":
        for field in ("edge_deployment", "cloud_deployment"):
            value = getattr(self, field)
            if value.count("/") != 1 or not all(value.split("/")):
                raise ValueError(f"remote.{field}={value!r}: expected '<flow name>/<deployment name>'")
        unknown = sorted(set(self.edge_stages + self.cloud_stages) - set(STAGE_TASKS))
        if unknown:
            raise ValueError(f"remote: unknown stage(s) {unknown}; stages that can run remotely: {sorted(STAGE_TASKS)}")
        both = sorted(set(self.edge_stages) & set(self.cloud_stages))
        if both:
            raise ValueError(f"remote: stage(s) {both} are placed on both the edge and the cloud")
        return self


# ------------------------------------------------------------------ parameters over the wire


def _hints(task: Task) -> dict[str, Any]:
    return typing.get_type_hints(task.fn)


def encode_params(task: Task, params: dict[str, Any]) -> dict[str, Any]:
    """A stage's parameters as JSON: references and configs only, so this stays small."""
    hints = _hints(task)
    unknown = sorted(set(params) - set(hints))
    if unknown:
        raise TypeError(f"stage {task.name!r} takes no parameter(s) {unknown}")
    return {k: to_jsonable_python(v) for k, v in params.items()}


def decode_params(task: Task, params: dict[str, Any]) -> dict[str, Any]:
    """The typed parameters again (StageResult, ModelRef, configs), validated against the task's signature."""
    hints = _hints(task)
    unknown = sorted(set(params) - set(hints))
    if unknown:
        raise TypeError(f"stage {task.name!r} takes no parameter(s) {unknown}")
    return {k: TypeAdapter(hints[k]).validate_python(v) for k, v in params.items()}


# ------------------------------------------------------------------ the flow a stage worker runs


def dispatch_record(flow_run_id: Any) -> str:
    """Where in the store a stage run writes what it did, for the parent that sent it (JSON, read as data)."""
    return f"dispatch/{flow_run_id}.json"


def localize(params: dict[str, Any]) -> dict[str, Any]:
    """A stage's parameters with the stage outputs and models they reference in this machine's
    copy of the store: from an object store, each is fetched here by its stage and cache key
    (the paths the sender saw are its own). With a local store nothing changes."""
    store = Store(params["store"])
    if store.remote is None:
        return params

    def fetched(stage: str, key: str) -> StageResult:
        found = store.lookup(stage, key)
        if found is None:
            raise RemoteStageError(f"input {stage}/{key} is not in the artifact store {store.location}: "
                                   "the run that sent this stage must publish it there first; run it again")  # fmt: skip
        return found

    def here(value: Any) -> Any:
        if isinstance(value, StageResult):
            return fetched(value.stage, value.key)
        if isinstance(value, ModelRef) and value.source is not None:
            found = fetched(value.source["stage"], value.source["key"])
            return value.model_copy(update={"path": str(Path(found.dir) / value.source["rel"])})
        if isinstance(value, list):
            return [here(v) for v in value]
        return value

    return {k: here(v) for k, v in params.items()}


@flow(name="run-stage", log_prints=True)
def run_stage_flow(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one stage task on this machine; record its key, whether it was reused, and the host."""
    from prefect.runtime import flow_run

    if stage not in STAGE_TASKS:
        raise ValueError(f"unknown stage {stage!r}; this flow runs {sorted(STAGE_TASKS)}")
    task = STAGE_TASKS[stage]
    typed = localize(decode_params(task, params))
    result, cached = run_here(task, typed)
    # `mirror`: where this machine keeps its copy of the store, which tells machines on one host apart
    done = {"stage": stage, "key": result.key, "code": result.code, "cached": cached, "host": socket.gethostname(),
            "mirror": str(Store(typed["store"]).root)}  # fmt: skip
    Store(typed["store"]).write_doc(dispatch_record(flow_run.id), done)
    return done


# ------------------------------------------------------------------ the parent's side


class StageFuture:
    """A stage running elsewhere, seen through the interface `collect` uses on Prefect futures."""

    def __init__(self, future: Future):
        self._future = future

    def wait(self, timeout: float | None = None) -> None:
        wait_futures([self._future], timeout=timeout)

    def result(self, timeout: float | None = None) -> StageResult:
        return self._future.result(timeout)[0]

    @property
    def state(self) -> State:
        if not self._future.done():
            return Pending()
        if (exc := self._future.exception()) is not None:
            return Failed(message=f"{type(exc).__name__}: {exc}")
        return Completed(name="Cached") if self._future.result()[1] else Completed()


def _upstream_ok(future: Any) -> None:
    future.wait()
    state = future.state
    if not state.is_completed():
        raise RemoteStageError(f"an upstream stage did not complete ({state.name}: {state.message})")


class RemoteStages:
    """Sends the stages it owns to their deployments; cache hits are served in the parent."""

    def __init__(self, cfg: RemoteConfig, max_parallel: int = 4):
        self.cfg = cfg
        self.where = {n: cfg.edge_deployment for n in cfg.edge_stages} | {n: cfg.cloud_deployment for n in cfg.cloud_stages}
        # every edge shard waits on its own stage run, beside SAEC's two cloud stages
        workers = max(max_parallel, cfg.edge_shards + 2)
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="saec-remote")
        self.dispatched: list[dict[str, Any]] = []  # stage, deployment, flow run, host of every stage sent

    def owns(self, task: Task) -> bool:
        return task.name in self.where

    def shards(self, task: Task) -> int:
        """How many shards a stage runs as: `edge_shards` for edge prediction, 1 for any other stage."""
        return self.cfg.edge_shards if task.name == predict_edge_task.name else 1

    def run(self, task: Task, params: dict[str, Any]) -> tuple[StageResult, bool]:
        if (hit := cached_result(task, params)) is not None:
            return hit, True
        return self._dispatch(task, params)

    def submit(self, task: Task, params: dict[str, Any], wait_for: list | None) -> StageFuture:
        def go() -> tuple[StageResult, bool]:
            for upstream in wait_for or []:
                _upstream_ok(upstream)
            return self.run(task, params)

        return StageFuture(self._threads.submit(contextvars.copy_context().run, go))

    def close(self, wait: bool = True) -> None:
        self._threads.shutdown(wait=wait, cancel_futures=True)

    def _dispatch(self, task: Task, params: dict[str, Any]) -> tuple[StageResult, bool]:
        deployment = self.where[task.name]
        label = params.get("label")
        name = f"{task.name} {label}" if label else task.name  # e.g. "score-cloud mvtec_holdout/cloud_only"
        log = run_logger()
        warn_if_unwatched(log)
        attempts = self.cfg.attempts
        for attempt in range(1, attempts + 1):
            run, state = self._send(task, deployment, params, name if attempt == 1 else f"{name} (attempt {attempt})",
                                    f"attempt {attempt} of {attempts}")  # fmt: skip
            why = resend_reason(state)
            if why is None:
                break
            if attempt < attempts:
                log.warning("stage %s: flow run %s (%s) %s; sending the stage again to %s (attempt %d of %d)",
                            task.name, run.name, run.id, why, deployment, attempt + 1, attempts)  # fmt: skip
        if not state.is_completed():
            tries = f" (attempt {attempt} of {attempts}; every one crashed)" if resend_reason(state) else ""
            raise RemoteStageError(f"stage {task.name!r} on {deployment}: flow run {run.name} ({run.id}) ended "
                                   f"{state.name}: {state.message}{tries}")  # fmt: skip
        decl = stage_of(task)
        key = decl.key(params)
        out = Store(params["store"]).read_doc(dispatch_record(run.id))
        if out is not None and not (isinstance(out, dict) and isinstance(out.get("host"), str)
                                    and isinstance(out.get("cached"), bool)):  # fmt: skip
            raise RemoteStageError(f"stage {task.name!r} completed as flow run {run.name}, but its record "
                                   f"{dispatch_record(run.id)} in {params['store']} is not one a worker writes; run again")  # fmt: skip
        if out is None:
            raise RemoteStageError(
                f"stage {task.name!r} completed as flow run {run.name}, but its record is not in the artifact store "
                f"{params['store']} as this machine ({socket.gethostname()}) sees it: store.root must be one object "
                "store URL, or one shared path, on every machine"
            )
        result = decl.lookup(params["store"], params)
        if result is None:
            if out.get("key") != key:
                raise RemoteStageError(
                    f"stage {task.name!r} ran on {out.get('host')} under cache key {out.get('key')} (code {out.get('code')}), "
                    f"this machine expects {key} (code {decl.code}): the worker runs other code or other library "
                    "versions; install the same version of SAEC on every machine"
                )
            raise RemoteStageError(f"stage {task.name!r} ran on {out.get('host')}, but its output {key} is missing "
                                   f"or damaged in {params['store']} as this machine sees it")  # fmt: skip
        self.dispatched.append({"stage": task.name, "deployment": deployment, "flow_run": str(run.id), "host": out["host"],
                                "mirror": out.get("mirror"), "cached": out["cached"], "label": label})  # fmt: skip
        return result, out["cached"]

    def _send(self, task: Task, deployment: str, params: dict[str, Any], name: str, attempt: str) -> tuple[Any, State]:
        """One flow run of `deployment` for the stage; returns it and its final state."""
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.states import Cancelled

        run = run_deployment(
            deployment,
            parameters={"stage": task.name, "params": encode_params(task, params)},
            flow_run_name=name,
            tags=["saec", deployment.split("/")[1]],
            timeout=0,
        )
        run_logger().info("stage %s: sent to %s as flow run %s (%s), %s", task.name, deployment, run.name, run.id, attempt)
        t0 = time.monotonic()
        started = None
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(run.id)
                state = run.state
                if state is not None and state.is_final():
                    return run, state
                now = time.monotonic()
                if started is None and state is not None and (state.is_pending() or state.is_running()):
                    started = now  # a worker took it
                if started is None and now - t0 > self.cfg.start_timeout_s:
                    client.set_flow_run_state(run.id, Cancelled(message="no worker picked it up"), force=True)
                    pool = client.read_deployment_by_name(deployment).work_pool_name
                    raise RemoteStageError(
                        f"stage {task.name!r}: no worker of work pool {pool!r} picked up flow run {run.name} "
                        f"within {self.cfg.start_timeout_s:.0f} s; start one with `saec deploy worker --pool {pool}`"
                    )
                if started is not None and self.cfg.timeout_s is not None and now - started > self.cfg.timeout_s:
                    client.set_flow_run_state(run.id, Cancelled(message="timed out"), force=True)
                    raise RemoteStageError(f"stage {task.name!r}: flow run {run.name} ran longer than {self.cfg.timeout_s} s")
                time.sleep(self.cfg.poll_interval_s)


def resend_reason(state: State) -> str | None:
    """Why a stage run that ended in `state` is sent again as a new flow run; None if it is not.

    Only a crash is sent again: the run's process or its machine went away before the stage
    could answer. Its worker reports that when the process dies under it; when the worker died
    too, the server's stage watch (see `saec deploy apply`) marks the run Crashed once its
    heartbeats stop. The stage's output is stored under its content key, so a second run on
    another worker computes the same thing, or reuses it if the first got as far as storing it.
    A Failed run raised in the stage (bad input, a bug): the same parameters fail again, so the
    failure is the answer. A Cancelled run was stopped on purpose, by someone or by a timeout.
    """
    if state.is_crashed():
        return f"crashed ({state.message or 'no message'})"
    return None


_watch_checked: set[str] = set()


def warn_if_unwatched(log: Any) -> None:
    """Warn, once per Prefect server, when it has no stage watch: a stage run whose machine dies
    would then stay Running, and its parent would wait for it as long as `timeout_s` allows."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from saec.deployments.deploy import STAGE_WATCH

    api = str(PREFECT_API_URL.value())
    if api in _watch_checked:
        return
    _watch_checked.add(api)
    try:
        with get_client(sync_client=True) as client:
            found = client.read_automations_by_name(STAGE_WATCH)
    except Exception as exc:  # the check is advice; the dispatch itself reports an unreachable server
        log.debug("could not look up automation %r: %s", STAGE_WATCH, exc)
        return
    if not any(a.enabled for a in found):
        log.warning("the Prefect server has no enabled automation %r: a stage run whose worker machine dies is not "
                    "marked Crashed and not sent again; create it with `saec deploy apply`", STAGE_WATCH)  # fmt: skip


# ------------------------------------------------------------------ deployed entry points


def entry_config(config: str | None, overrides: list[str] | None) -> PipelineConfig:
    """The configuration of a deployed run: validated before any work, with the store as an absolute path."""
    cfg = load_config(config, overrides)  # ConfigError names the field and the fix
    return cfg.model_copy(update={"store": cfg.store.resolved()})


def run_summary(run: RunFolder, **extra: Any) -> dict[str, Any]:
    """What a deployed run did, also kept in its run record (`extra`: the stages sent to the pools)."""
    if extra:
        run.record.update(extra)
        run.save()
    rec = run.record
    return {
        "run_id": run.run_id,
        "run_dir": str(run.path),
        "status": rec.get("status"),
        "stages": {name: st["state"] for name, st in rec["stages"].items()},
        "reports": rec.get("reports", {}),
        **extra,
    }


@contextmanager
def stage_placement(cfg: PipelineConfig, distributed: bool, remote: RemoteConfig | None) -> Iterator[RemoteStages | None]:
    """Within this block the edge and cloud stages go to their work pools (distributed), or nothing changes."""
    if not distributed:
        yield None
        return
    stages = RemoteStages(remote or RemoteConfig())
    failed = True
    try:
        with placed(stages):
            yield stages
        failed = False
    finally:
        # after a failure, stage runs already sent finish on their workers (and fill the cache)
        stages.close(wait=not failed)


@flow(name="saec-pipeline", flow_run_name=run_name("saec-pipeline"), log_prints=True)
def saec_pipeline(
    config: str | None = None,
    overrides: list[str] | None = None,
    distributed: bool = False,
    remote: RemoteConfig | None = None,
) -> dict[str, Any]:
    """The whole pipeline: in this process, or with edge and cloud stages on their work pools.

    `config` is a YAML file and `overrides` are `section.field=value` items, as for `saec run`.
    """
    cfg = entry_config(config, overrides)
    with stage_placement(cfg, distributed, remote) as stages:
        out = pipeline_flow(cfg)
    publish_summary(cfg, out["run"], out["reports"])  # on this run too: the page a deployment run opens
    return run_summary(out["run"], dispatched=stages.dispatched if stages else [])
