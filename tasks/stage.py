"""Stages: declared once, cached in the artifact store, run as Prefect tasks.

A stage is a plain function that builds its output into the folder it is given and returns
({output name: file or folder inside it}, info):

    @stage("scan_mvtec", task="scan-mvtec")
    def scan_mvtec(out: Path, source: DatasetRef, cfg: ScanConfig) -> Built:
        ...

That declaration is the only place the stage is named. From it come:

* its cache key: the stage name, the code version of everything the function runs
  (`saec.artifacts.code`: computed from the source, comments and docstrings excluded), the
  versions of the libraries that compute results, and its parameters, each data input by
  content (a stage output by the identity of what it holds, a model folder by the hash of
  its files, a dataset folder by that and its path, which its scan records, a weights file
  in a config by its bytes). Parameters named in
  `observe` say how to watch the stage, not what it computes, and are not keyed;
* its folder in the artifact store, `stages/<name>/<key>/`, which is the cache: a verified
  folder there is a hit, and nothing else is (Prefect keeps no result records of its own);
* a Prefect task named `task`, called as `scan_mvtec(store=..., source=..., cfg=...)`,
  which returns the `StageResult` and ends in a Completed state named "Cached" on a hit.

Tasks take and return small references (`DatasetRef`, `ModelRef`, `StageResult`), never data.

A stage that takes a `shard: Shard | None` parameter can run as several shards, each a stage
run of its own (keyed by its shard like any parameter) over a contiguous part of its input
table, where a placement asks for that (`saec.flows.common`). Its merge stage, declared with
`merges=<its task name>`, takes the shards' outputs in order (`parts`) and writes the outputs
the stage writes unsharded.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import shutil
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from pydantic import BaseModel, ConfigDict, Field, model_validator

from saec.artifacts.code import code_identity
from saec.artifacts.hashing import hash_obj
from saec.artifacts.store import OUTPUT_OF, DatasetRef, ModelRef, StageResult, Store

Built = tuple[dict[str, Path], dict[str, Any]]
__all__ = ["Built", "DatasetRef", "ModelRef", "STAGES", "Shard", "Stage", "keyable", "stage", "stage_of"]

# Libraries whose version can change what a stage computes; every key holds their versions.
LIBRARIES = ("numpy", "pandas", "pyarrow", "pillow", "opencv-python", "opencv-python-headless", "torch", "torchvision",
             "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "ultralytics", "onnx", "onnxruntime")  # fmt: skip


class Shard(BaseModel):
    """Shard `index` (from 0) of `count`: one contiguous part of a stage's input table, in its order."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    index: int = Field(ge=0)
    count: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> "Shard":
        if self.index >= self.count:
            raise ValueError(f"shard index {self.index} is not below the shard count {self.count}")
        return self

    @property
    def name(self) -> str:
        """How run records and labels name it: "1of2" is the first of two."""
        return f"{self.index + 1}of{self.count}"

    def bounds(self, rows: int, block: int = 1) -> tuple[int, int]:
        """(start, stop) of this shard's rows in a table of `rows` rows.

        The table is cut, in its order, into blocks of `block` rows (the last may be shorter),
        and the blocks are dealt out in contiguous runs, the first `blocks % count` shards
        taking one block more. It depends on the row count only: every machine cuts alike.
        """
        if block < 1:
            raise ValueError(f"shard block size must be at least 1, got {block}")
        blocks = -(-rows // block)
        per, extra = divmod(blocks, self.count)
        first = self.index * per + min(self.index, extra)
        last = first + per + (1 if self.index < extra else 0)
        return min(first * block, rows), min(last * block, rows)


def keyable(value: Any) -> Any:
    """What of a parameter enters a cache key: content identities; where files lie only for a
    dataset folder, whose scan records its files' paths."""
    if isinstance(value, StageResult):
        return {"stage": value.output_of, "digest": value.digest()}
    if isinstance(value, DatasetRef):  # a scan records the files' paths, so where they lie is an input too
        return {"kind": value.kind, "sha256": value.sha256, "path": value.path}
    if isinstance(value, ModelRef):
        return {"kind": value.kind, "sha256": value.sha256}
    if isinstance(value, BaseModel):
        view = getattr(value, "cache_key_view", None)
        return keyable(view() if callable(view) else value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {k: keyable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [keyable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@lru_cache(maxsize=None)
def library_versions() -> dict[str, str | None]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


STAGES: dict[str, "Stage"] = {}  # by Prefect task name


class Stage:
    """One stage's declaration: its name, the function that builds it, what is not keyed."""

    def __init__(self, name: str, fn: Callable[..., Built], *, task: str, work_dir: bool = False,
                 observe: tuple[str, ...] = (), measurements: tuple[str, ...] = ("telemetry",), retries: int = 0,
                 merges: str | None = None):  # fmt: skip
        self.name = name
        self.fn = fn
        self.work_dir = work_dir
        self.observe = frozenset(observe)
        self.measurements = tuple(measurements)
        sig = inspect.signature(fn)
        skip = 2 if work_dir else 1  # (out) or (out, work)
        listed = list(sig.parameters.values())[skip:]
        self.wants_store = any(p.name == "store" for p in listed)  # a stage may keep a cache in the store
        self.params = [p for p in listed if p.name != "store"]
        self.merged_by: Stage | None = None  # the stage that merges this one's shards, if it can be sharded
        self.output_of: str | None = None  # for a merge: the stage whose output it writes from the shards'
        self.task = self._make_task(task, retries)
        if merges is not None:
            self._merge(merges)

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, task={self.task.name!r})"

    def _merge(self, task: str) -> None:
        """Declare this stage the merge of stage task `task`'s shards."""
        target = STAGES.get(task)
        if target is None:
            raise ValueError(f"stage {self.name!r} merges the shards of {task!r}, which is not declared (yet)")
        if "shard" not in {p.name for p in target.params}:
            raise ValueError(f"stage {target.name!r} takes no `shard` parameter: it cannot be sharded")
        if "parts" not in {p.name for p in self.params}:
            raise ValueError(f"stage {self.name!r} merges shards, so it takes their outputs as `parts`")
        target.merged_by = self
        self.output_of = target.name

    @cached_property
    def code(self) -> str:
        """The code version: everything the function runs, and the library versions."""
        return hash_obj({"code": code_identity(self.fn), "libraries": library_versions()})[:16]

    def key(self, params: dict[str, Any]) -> str:
        unknown = sorted(set(params) - {p.name for p in self.params} - {"store"})
        if unknown:
            raise TypeError(f"stage {self.name!r} takes no parameter(s) {unknown}")
        # the parameters as the task binds them, defaults filled in: a key computed from the arguments a
        # caller gave (a placement, a lookup) is the key the task computes
        given = {p.name: p.default for p in self.params if p.default is not inspect.Parameter.empty} | params
        inputs = {k: keyable(v) for k, v in sorted(given.items()) if k not in self.observe and k != "store"}
        return hash_obj({"stage": self.name, "code": self.code, "inputs": inputs})[:24]

    def lookup(self, store: str | Path, params: dict[str, Any]) -> StageResult | None:
        """The verified stored output for these parameters, or None; computes nothing."""
        return Store(store).lookup(self.name, self.key(params))

    def get(self, store: str | Path, params: dict[str, Any]) -> tuple[StageResult, bool]:
        """(output, reused): the stored output, or built now under the key's lock."""
        st = Store(store)
        key = self.key(params)
        kwargs = {k: v for k, v in params.items() if k != "store"}
        if self.wants_store:
            kwargs["store"] = str(st.root)
        work = st.root / "work" / self.name / key

        def build(out: Path) -> Built:
            if self.work_dir:
                work.mkdir(parents=True, exist_ok=True)
            files, info = self.fn(out, work, **kwargs) if self.work_dir else self.fn(out, **kwargs)
            if self.output_of is not None:  # the same content as the sharded stage's output: the same identity
                info = {**info, OUTPUT_OF: self.output_of}
            return files, info

        result, reused = st.get_or_build(self.name, key, build, measurements=self.measurements, code=self.code)
        if self.work_dir and not reused:  # published: the checkpoints that let a failed build resume are done with
            shutil.rmtree(st.root / "work" / self.name / key, ignore_errors=True)
        return result, reused

    def _make_task(self, name: str, retries: int) -> Task:
        decl = self

        def run(store: str, **params: Any) -> Any:
            result, reused = decl.get(store, params)
            return Completed(name="Cached", data=result, message="output found in the artifact store") if reused else result

        store_param = inspect.Parameter("store", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="str")
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in self.params]  # passed by name
        run.__signature__ = inspect.Signature([store_param, *params], return_annotation="StageResult")  # type: ignore[attr-defined]
        run.__annotations__ = {"store": "str", **{p.name: p.annotation for p in self.params}, "return": "StageResult"}
        run.__wrapped__ = self.fn  # type: ignore[attr-defined]  # type hints resolve in the stage's module
        for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
            setattr(run, attr, getattr(self.fn, attr))
        task = Task(fn=run, name=name, cache_policy=NO_CACHE, persist_result=False, retries=retries)
        known = STAGES.get(name)
        if known is not None and (known.fn.__module__, known.fn.__qualname__) != (self.fn.__module__, self.fn.__qualname__):
            raise ValueError(f"two stages are declared with the task name {name!r}")
        STAGES[name] = self
        return task


def stage(name: str, *, task: str, work_dir: bool = False, observe: tuple[str, ...] = (),
          measurements: tuple[str, ...] = ("telemetry",), retries: int = 0,
          merges: str | None = None) -> Callable[[Callable[..., Built]], Task]:  # fmt: skip
    """Declare a cached stage; the decorated function becomes its Prefect task (see the module docstring).

    `work_dir`: the function also gets a folder that survives a failed or interrupted build
    (checkpoints live there, so a re-run resumes). `measurements`: outputs that record how the
    run went (telemetry samples, timings) and are not part of the output's identity. `merges`:
    the task name of a stage declared before, with a `shard` parameter, whose shards this stage
    merges (it takes them as `parts`, in shard order).
    """

    def declare(fn: Callable[..., Built]) -> Task:
        return Stage(name, fn, task=task, work_dir=work_dir, observe=observe, measurements=measurements, retries=retries,
                     merges=merges).task  # fmt: skip

    return declare


def stage_of(task: Task) -> Stage:
    """The declaration behind a stage task (or one made from it with `with_options`)."""
    try:
        return STAGES[task.name]
    except KeyError:
        raise LookupError(f"{task.name!r} is not a declared stage; stages: {sorted(STAGES)}") from None
