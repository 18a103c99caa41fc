"""What every flow does around a stage task: call it, notice a stale cache, record the outcome."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture

from saec.artifacts.store import RunFolder, StageResult


def _outputs_present(result: StageResult) -> bool:
    return Path(result.dir).is_dir() and all(Path(ref.path).exists() for ref in result.outputs.values())


class InjectedFailure(RuntimeError):
    """A failure asked for by `faults.fail_before`, to exercise resuming."""


def check_fault(run: RunFolder, task: Task, name: str | None) -> None:
    wanted = set(run.record.get("fail_before", []))
    hit = wanted & {task.name, name}
    if hit:
        raise InjectedFailure(f"injected failure before stage {sorted(hit)[0]!r} (config faults.fail_before)")


def call_stage(run: RunFolder, task: Task, name: str | None = None, **params: Any) -> StageResult:
    """Run a cached stage task and record in the run folder whether it ran or hit the cache.

    If Prefect holds a cached result whose files were deleted from the store, the task
    runs again with its cache refreshed instead of handing back a dangling reference.
    """
    check_fault(run, task, name)
    state = task(**params, return_state=True)
    result: StageResult = state.result()
    if not _outputs_present(result):
        state = task.with_options(refresh_cache=True)(**params, return_state=True)
        result = state.result()
    run.add_stage(result, "cached" if state.name == "Cached" else "ran", name)
    return result


def collect(run: RunFolder, future: PrefectFuture, name: str, task: Task, **params: Any) -> StageResult:
    """Wait for a submitted stage task and record it like `call_stage` does."""
    check_fault(run, task, name)
    result: StageResult = future.result()
    state = future.state
    if not _outputs_present(result):
        state = task.with_options(refresh_cache=True)(**params, return_state=True)
        result = state.result()
    run.add_stage(result, "cached" if state.name == "Cached" else "ran", name)
    return result
