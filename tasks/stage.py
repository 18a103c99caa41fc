"""How a stage becomes a cached Prefect task.

A stage's cache key is the hash of (stage name, code version of the modules that
compute it, its configuration, and the content hashes of its inputs). The same
key names its output folder in the artifact store, so a cache hit in Prefect and
an existing folder in the store always agree. Tasks take and return small
references (`DatasetRef`, `StageResult`), never the data.
"""
from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel

from saec.artifacts.hashing import code_version, hash_obj
from saec.artifacts.store import StageResult, Store

# Every stage task persists its (small) result so that later runs can hit the cache.
STAGE_TASK: dict[str, Any] = {"persist_result": True, "cache_expiration": None}


class ModelRef(BaseModel):
    """A model folder (or weights file) and its identity hash."""

    kind: str
    path: str
    sha256: str


class DatasetRef(BaseModel):
    """A source dataset folder and the content hash of everything in it."""

    kind: str
    path: str
    sha256: str
    files: int


def _keyable(value: Any) -> Any:
    if isinstance(value, StageResult):
        return {"stage": value.stage, "digest": value.digest()}
    if isinstance(value, (DatasetRef, ModelRef)):
        return {"kind": value.kind, "sha256": value.sha256}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _keyable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_keyable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@lru_cache(maxsize=None)
def _code(modules: tuple[str, ...]) -> str:
    return code_version(*modules)


# Parameters that say where or how to observe a stage, not what it computes.
NOT_KEYED = frozenset({"store", "telemetry", "label"})


def stage_key(stage: str, modules: Iterable[str], params: dict[str, Any]) -> str:
    inputs = {k: _keyable(v) for k, v in sorted(params.items()) if k not in NOT_KEYED}
    return hash_obj({"stage": stage, "code": _code(tuple(sorted(set(modules)))), "inputs": inputs})[:24]


_BASE_MODULES = ("saec.tasks.stage", "saec.artifacts.store", "saec.artifacts.schemas")


def stage_cache_key(stage: str, modules: Iterable[str] = ()) -> Callable[[Any, dict], str]:
    """A Prefect `cache_key_fn` for `stage`; call it at module level of the task's module."""
    caller = sys._getframe(1).f_globals["__name__"]
    mods = (*_BASE_MODULES, caller, *modules)

    def cache_key(_ctx: Any, params: dict[str, Any]) -> str:
        # the store is part of Prefect's key (each store caches its own outputs), not of the folder name
        where = hash_obj(str(Path(params["store"]).resolve()))[:8]
        return f"{stage}-{stage_key(stage, mods, params)}-{where}"

    cache_key.modules = mods  # type: ignore[attr-defined]
    return cache_key


def run_stage(
    store: str | Path,
    stage: str,
    modules: Iterable[str],
    params: dict[str, Any],
    build: Callable[..., tuple[dict[str, Path], dict[str, Any]]],
    *,
    work_dir: bool = False,
) -> StageResult:
    """Return the stage output for these params, building it only if the store lacks it.

    With `work_dir=True`, `build(out, work)` also gets a folder that survives a failed or
    interrupted build (checkpoints live there, so a re-run resumes).
    """
    caller = sys._getframe(1).f_globals["__name__"]
    key = stage_key(stage, (*_BASE_MODULES, caller, *modules), params)
    st = Store(store)
    existing = st.load_stage(stage, key)
    if existing is not None:
        return existing
    if work_dir:
        work = st.root / "work" / stage / key
        work.mkdir(parents=True, exist_ok=True)
        return st.build_stage(stage, key, lambda out: build(out, work))
    return st.build_stage(stage, key, build)
