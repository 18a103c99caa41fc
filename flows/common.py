"""What every flow does around a stage task: call it where it is placed, record whether it was built or reused."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Protocol

from prefect import Task
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed, Pending, State

from saec.artifacts.store import RunFolder, StageResult
from saec.tasks.stage import Shard, stage_of
from saec.errors import ActionableError


class InjectedFailure(ActionableError, RuntimeError):
    """A failure asked for by `faults.fail_before`, to exercise resuming."""


# --- one-shot faults (`faults.fail_before: ["once:<stage>"]`) -------------------------------------
# A plain name fails every attempt. "once:<stage>" fails only the first attempt of a top-level
# Prefect flow run: a marker under <store>/faults/ remembers that it fired, so
# `prefect flow-run retry` of the same run passes the stage and resumes from the cache.
def _fires_once(run: RunFolder, stage: str) -> bool:
    from prefect.runtime import flow_run

    attempt = flow_run.root_flow_run_id or flow_run.id or run.run_id
    marker = run.path.parent.parent / "faults" / str(attempt) / stage.replace("/", "__")
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"fired in run {run.run_id}\n")
    return True


def check_fault(run: RunFolder, task: Task, name: str | None) -> None:
    wanted = set(run.record.get("fail_before", []))
    hit = wanted & {task.name, name}
    if hit:
        raise InjectedFailure(f"injected failure before stage {sorted(hit)[0]!r} (config faults.fail_before)")
    once = {w.removeprefix("once:") for w in wanted if w.startswith("once:")} & {task.name, name}
    if once and _fires_once(run, sorted(once)[0]):
        raise InjectedFailure(f"injected one-shot failure before stage {sorted(once)[0]!r} (config faults.fail_before)")


# --- stage placement: where a stage task executes --------------------------------------------------
# By default every stage runs in the calling process. A flow may place some stages elsewhere
# (flows/remote.py sends the edge and cloud stages to their work pools) or refuse to compute
# them (flows/reevaluate.py takes the trained models from the cache only); the flows that
# call stages stay the same.
#
# A placement may also split a stage into shards: with a method `shards(task) -> int` (1 where
# a placement has none) that asks for more than one, the stage runs as that many shard stage
# runs, submitted through the placement side by side, and its merge stage then runs in the
# calling process (it only reads their outputs). Only a stage declared with a merge stage can be
# sharded (`saec.tasks.stage`).
class StagePlacement(Protocol):
    def owns(self, task: Task) -> bool:
        """Whether this placement executes `task`."""

    def run(self, task: Task, params: dict[str, Any]) -> tuple[StageResult, bool]:
        """Execute the stage; return its result and whether it came from the store."""

    def submit(self, task: Task, params: dict[str, Any], wait_for: list | None) -> Any:
        """Start the stage; return a future with `.result()`, `.wait()` and `.state` like Prefect's."""


_PLACEMENTS: ContextVar[tuple[StagePlacement, ...]] = ContextVar("saec_stage_placements", default=())


@contextmanager
def placed(placement: StagePlacement) -> Iterator[StagePlacement]:
    """Within this block, the stages `placement` owns run where it says (innermost block first)."""
    token = _PLACEMENTS.set((placement, *_PLACEMENTS.get()))
    try:
        yield placement
    finally:
        _PLACEMENTS.reset(token)


def _placement_of(task: Task) -> StagePlacement | None:
    return next((p for p in _PLACEMENTS.get() if p.owns(task)), None)


def runs_here(task: Task) -> bool:
    """Whether stage `task` executes in this process (no placement sends it elsewhere)."""
    return _placement_of(task) is None


def cached_result(task: Task, params: dict[str, Any]) -> StageResult | None:
    """The verified stored output of stage `task` for `params`, or None; computes nothing."""
    return stage_of(task).lookup(params["store"], params)


def run_here(task: Task, params: dict[str, Any]) -> tuple[StageResult, bool]:
    """Run a stage task in this process; return (result, whether it came from the store)."""
    state = task(**params, return_state=True)
    result: StageResult = state.result()
    return result, state.name == "Cached"


def shard_count(placement: StagePlacement | None, task: Task) -> int:
    """How many shards `placement` runs stage `task` as (1: not sharded)."""
    ask = getattr(placement, "shards", None)
    count = int(ask(task)) if ask is not None else 1
    if count > 1 and stage_of(task).merged_by is None:
        raise ValueError(f"stage {task.name!r} is placed as {count} shards, but no merge stage is declared for it")
    return max(count, 1)


class ShardedStage:
    """A stage run as shards through its placement, merged in this process once they are done.

    Seen through the interface `collect` uses on Prefect futures (`result`, `wait`, `state`);
    `collect` and `call_stage` also record each shard.
    """

    def __init__(self, placement: StagePlacement, task: Task, params: dict[str, Any], count: int,
                 wait_for: list | None = None):  # fmt: skip
        self.task = task
        self.merge = stage_of(task).merged_by.task  # type: ignore[union-attr]
        self.params = params
        self.shards = [Shard(index=i, count=count) for i in range(count)]
        self.futures = [placement.submit(task, self._shard_params(s), wait_for) for s in self.shards]
        self._lock = threading.Lock()
        self._merged: tuple[StageResult, bool] | None = None
        self._error: BaseException | None = None

    def _shard_params(self, shard: Shard) -> dict[str, Any]:
        extra = {"label": f"{self.params['label']}#{shard.name}"} if self.params.get("label") else {}
        return self.params | {"shard": shard} | extra

    def outcome(self) -> tuple[StageResult, bool]:
        """(merged result, whether the merge came from the store), once every shard is done."""
        with self._lock:
            if self._merged is None and self._error is None:
                try:
                    parts = [f.result() for f in self.futures]
                    params = {"store": self.params["store"], "parts": parts}
                    if self.params.get("label"):
                        params["label"] = self.params["label"]
                    self._merged = run_here(self.merge, params)  # never placed: it only reads the shards' outputs
                except BaseException as exc:
                    self._error = exc
            if self._error is not None:
                raise self._error
            return self._merged  # type: ignore[return-value]

    def parts(self) -> list[tuple[StageResult, bool]]:
        """(result, came from the store) of every shard, in order (after `outcome`)."""
        return [(f.result(), f.state.name == "Cached") for f in self.futures]

    def state_name(self) -> str:
        """How the run record names it: cached when every shard came from the store, ran when
        every one was built, else partly cached (the merge itself only reads them)."""
        cached = [c for _, c in self.parts()]
        return "cached" if all(cached) else "ran" if not any(cached) else "partly cached"

    def result(self, timeout: float | None = None) -> StageResult:
        return self.outcome()[0]

    def wait(self, timeout: float | None = None) -> None:
        try:
            self.outcome()
        except BaseException:
            pass  # the state says how it ended

    @property
    def state(self) -> State:
        if self._error is not None:
            return Failed(message=f"{type(self._error).__name__}: {self._error}")
        if self._merged is None:
            return Pending()
        return Completed(name="Cached") if self.state_name() == "cached" else Completed()


def _sharded(task: Task, params: dict[str, Any], wait_for: list | None = None) -> ShardedStage | None:
    """The stage's shards, started, where its placement asks for more than one; else None."""
    placement = _placement_of(task)
    count = shard_count(placement, task) if placement is not None else 1
    return ShardedStage(placement, task, params, count, wait_for) if count > 1 else None  # type: ignore[arg-type]


def execute_stage(task: Task, params: dict[str, Any]) -> tuple[StageResult, bool]:
    """Run a stage task where its placement says (by default here); return (result, came from the store)."""
    if (sharded := _sharded(task, params)) is not None:
        return sharded.result(), sharded.state_name() == "cached"
    placement = _placement_of(task)
    if placement is None:
        return run_here(task, params)
    return placement.run(task, params)


def submit_stage(task: Task, wait_for: list | None = None, **params: Any) -> Any:
    """`task.submit(**params)`, or the placement's equivalent; hand the future to `collect`."""
    if (sharded := _sharded(task, params, wait_for)) is not None:
        return sharded
    placement = _placement_of(task)
    if placement is None:
        return task.submit(**params, wait_for=wait_for)
    return placement.submit(task, params, wait_for)


# --- recording stages in the run folder ------------------------------------------------------------
def start_run(cfg, flow: str) -> RunFolder:
    """A new run folder in the configured store, carrying the run's injected faults.

    Before it starts: the store must be writable (a one-line StoreError otherwise), runs of
    this machine whose process died are marked interrupted, and build folders that dead
    processes left behind are removed.
    """
    from prefect.runtime import deployment, flow_run

    from saec.artifacts.code import project_code_version
    from saec.artifacts.store import Store

    store = Store(cfg.store.root)
    store.check_writable()
    store.mark_interrupted()
    store.clear_leftovers()
    run = store.new_run(flow)
    run.record["fail_before"] = list(cfg.faults.fail_before)
    run.record["flow_run_id"] = flow_run.id  # the Prefect flow run, and the deployment run above it
    run.record["root_flow_run_id"] = flow_run.root_flow_run_id
    run.record["deployment"] = deployment.name  # the deployment that started it; None from the command line
    run.record["code_version"] = project_code_version()
    run.save()
    return run


def end_run(run: RunFolder, exc: BaseException) -> None:
    """Record how a run ended when it did not complete: interrupted (stopped, cancelled) or failed."""
    from asyncio import CancelledError

    from prefect.exceptions import TerminationSignal

    if isinstance(exc, (KeyboardInterrupt, SystemExit, CancelledError, TerminationSignal)):
        run.finish("interrupted", error=f"{type(exc).__name__}: {exc}".rstrip(": "))
    else:
        run.finish("failed", error=f"{type(exc).__name__}: {exc}")


def call_stage(run: RunFolder, task: Task, name: str | None = None, **params: Any) -> StageResult:
    """Run a stage task and record in the run folder whether it was built or came from the store."""
    check_fault(run, task, name)
    t0 = time.perf_counter()
    if (sharded := _sharded(task, params)) is not None:
        result = sharded.result()
        _record_shards(run, sharded, name or stage_of(task).name, time.perf_counter() - t0)
        return result
    result, cached = execute_stage(task, params)
    run.add_stage(result, "cached" if cached else "ran", name, seconds=time.perf_counter() - t0)
    return result


def collect(run: RunFolder, future: PrefectFuture, name: str, task: Task, **params: Any) -> StageResult:
    """Wait for a submitted stage task and record it like `call_stage` does."""
    check_fault(run, task, name)
    result: StageResult = future.result()
    if isinstance(future, ShardedStage):
        _record_shards(run, future, name, None)
        return result
    cached = future.state.name == "Cached"
    # a submitted stage overlapped others: its own time is its build's (a hit took next to none)
    run.add_stage(result, "cached" if cached else "ran", name, seconds=None if cached else result.build_s)
    return result


def _record_shards(run: RunFolder, sharded: ShardedStage, name: str, seconds: float | None) -> None:
    """The merged output under the stage's name, then each shard as `<name>#1of2`, ...

    A submitted stage's own time (`seconds` None) is the longest build among its shards plus the
    merge's, where they were built.
    """
    parts = sharded.parts()
    merged, merge_cached = sharded.outcome()
    state = sharded.state_name()
    if seconds is None and state != "cached":
        seconds = max((r.build_s or 0.0 for r, cached in parts if not cached), default=0.0)
        seconds += 0.0 if merge_cached else (merged.build_s or 0.0)
    run.add_stage(merged, state, name, seconds=seconds)
    for shard, (result, cached) in zip(sharded.shards, parts):
        run.add_stage(result, "cached" if cached else "ran", f"{name}#{shard.name}", seconds=None if cached else result.build_s)


# --- flow run names --------------------------------------------------------------------------------
def run_name(flow: str):
    """A `flow_run_name` for the flows that take the configuration (`cfg`, or `config` and
    `overrides`): the flow, its evaluation sets and the tag of store and configuration that its
    artifacts' keys carry, e.g. "pipeline mvtec_holdout+ksdd2_1to1 [3aafbf6b]"."""

    def name() -> str:
        from prefect.runtime import flow_run

        from saec.config import PipelineConfig
        from saec.flows.evaluate import artifact_tag

        params = flow_run.parameters or {}
        try:
            cfg = params.get("cfg")
            if cfg is None:
                from saec.flows.remote import entry_config

                cfg = entry_config(params.get("config"), params.get("overrides"))
            elif not isinstance(cfg, PipelineConfig):
                cfg = PipelineConfig.model_validate(cfg)
        except Exception:  # a wrong configuration fails the run itself, with its own message
            return flow
        mode = " distributed" if params.get("distributed") else ""
        return f"{flow}{mode} {'+'.join(cfg.evaluate.datasets)} [{artifact_tag(cfg)}]"

    return name
