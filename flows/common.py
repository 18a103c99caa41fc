"""What every flow does around a stage task: call it, notice a stale cache, record the outcome."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Protocol

from prefect import Task
from prefect.futures import PrefectFuture

from saec.artifacts.store import RunFolder, StageResult


def outputs_present(result: StageResult) -> bool:
    """Whether every file a stage result names exists (from this machine)."""
    return Path(result.dir).is_dir() and all(Path(ref.path).exists() for ref in result.outputs.values())


class InjectedFailure(RuntimeError):
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
class StagePlacement(Protocol):
    def owns(self, task: Task) -> bool:
        """Whether this placement executes `task`."""

    def run(self, task: Task, params: dict[str, Any], refresh: bool) -> tuple[StageResult, bool]:
        """Execute the stage; return its result and whether it came from the cache."""

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


def is_cached(task: Task, params: dict[str, Any]) -> bool:
    """Whether Prefect holds a cached result of `task` for `params` (asks the cache, computes nothing)."""
    from prefect.results import get_result_store

    key = task.cache_key_fn(None, params) if task.cache_key_fn else None
    return bool(key) and get_result_store().update_for_task(task, _sync=True).exists(key)


def cached_result(task: Task, params: dict[str, Any]) -> StageResult | None:
    """The cached output of `task` for `params` if Prefect holds one whose files exist; None otherwise.

    Nothing is computed: the task is called only when its cache record exists, and then
    Prefect hands back the stored reference.
    """
    if not is_cached(task, params):
        return None
    state = task(**params, return_state=True)
    result: StageResult = state.result()
    return result if state.name == "Cached" and outputs_present(result) else None


def run_here(task: Task, params: dict[str, Any], refresh: bool = False) -> tuple[StageResult, bool]:
    """Run a stage task in this process; a cached result whose files are gone is rebuilt."""
    state = (task.with_options(refresh_cache=True) if refresh else task)(**params, return_state=True)
    result: StageResult = state.result()
    if not refresh and not outputs_present(result):
        return run_here(task, params, refresh=True)
    return result, state.name == "Cached"


def execute_stage(task: Task, params: dict[str, Any], refresh: bool = False) -> tuple[StageResult, bool]:
    """Run a stage task where its placement says (by default here); return (result, came from cache)."""
    placement = _placement_of(task)
    if placement is None:
        return run_here(task, params, refresh)
    return placement.run(task, params, refresh)


def submit_stage(task: Task, wait_for: list | None = None, **params: Any) -> Any:
    """`task.submit(**params)`, or the placement's equivalent; hand the future to `collect`."""
    placement = _placement_of(task)
    if placement is None:
        return task.submit(**params, wait_for=wait_for)
    return placement.submit(task, params, wait_for)


# --- recording stages in the run folder ------------------------------------------------------------
def start_run(cfg, flow: str) -> RunFolder:
    """A new run folder in the configured store, carrying the run's injected faults."""
    from saec.artifacts.store import Store

    run = Store(cfg.store.root).new_run(flow)
    run.record["fail_before"] = list(cfg.faults.fail_before)
    return run


def call_stage(run: RunFolder, task: Task, name: str | None = None, **params: Any) -> StageResult:
    """Run a cached stage task and record in the run folder whether it ran or hit the cache.

    If Prefect holds a cached result whose files were deleted from the store, the task
    runs again with its cache refreshed instead of handing back a dangling reference.
    """
    check_fault(run, task, name)
    result, cached = execute_stage(task, params)
    run.add_stage(result, "cached" if cached else "ran", name)
    return result


def collect(run: RunFolder, future: PrefectFuture, name: str, task: Task, **params: Any) -> StageResult:
    """Wait for a submitted stage task and record it like `call_stage` does."""
    check_fault(run, task, name)
    result: StageResult = future.result()
    cached = future.state.name == "Cached"
    if not outputs_present(result):
        result, cached = execute_stage(task, params, refresh=True)
    run.add_stage(result, "cached" if cached else "ran", name)
    return result
