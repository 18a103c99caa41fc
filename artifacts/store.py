"""The artifact store: one folder per stage output, one folder per run, atomic writes.

Layout under the store root (git-ignored):

    stages/<stage>/<key>/          one finished stage output; <key> is its cache key
        _stage.json                what the stage wrote: outputs with content hashes, counts
        *.parquet, ...
    runs/<run_id>/run.json         which stage outputs a run used, and whether each was cached
    prefect/                       Prefect's persisted task results (cache records)

A stage output is built in a hidden temporary folder and renamed into place when
complete, so a crash never leaves a half-written output under its final name.
Tables are written to a temporary file and renamed the same way.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from saec.artifacts.hashing import canonical_json, hash_obj, sha256_file
from saec.artifacts.schemas import SCHEMAS, conform

STAGE_RECORD = "_stage.json"


class FileRef(BaseModel):
    """A file an output holds: its absolute path and content hash (rows for tables)."""

    path: str
    sha256: str
    rows: int | None = None
    schema_name: str | None = None

    def read(self) -> pd.DataFrame:
        return read_table(self.path)


class StageResult(BaseModel):
    """What a stage task returns: a small reference, never the data itself."""

    stage: str
    key: str
    dir: str
    outputs: dict[str, FileRef] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)
    created: str = ""

    def table(self, name: str) -> pd.DataFrame:
        return read_table(self.outputs[name].path)

    def path(self, name: str) -> Path:
        return Path(self.outputs[name].path)

    def digest(self) -> str:
        """Content identity of this output: the hashes of everything it holds."""
        return hash_obj({"stage": self.stage, "outputs": {k: v.sha256 for k, v in self.outputs.items()}})


# --------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; if the block succeeds it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_BUILDING}", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    text = json.dumps(json.loads(canonical_json(obj)), indent=2, sort_keys=True)
    return write_bytes_atomic(path, (text + "\n").encode())


def write_table(df: pd.DataFrame, schema_name: str, path: str | Path) -> FileRef:
    """Write `df` as Parquet with the declared schema `schema_name`, atomically."""
    table = conform(df, schema_name)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return FileRef(path=str(Path(path).resolve()), sha256=sha256_file(path), rows=table.num_rows, schema_name=schema_name)


def read_table(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    return pq.read_table(path, columns=columns).to_pandas()


# --------------------------------------------------------------------------- the store

_BUILDING = ".building-"


def published_path(path: str | Path) -> Path:
    """Where a file written inside a stage's temporary build folder will live once published.

    Tables that name files of their own stage (a holdout's `val/` links) must record this
    path, not the temporary one. Paths outside a build folder are returned unchanged.
    """
    path = Path(path)
    for i, part in enumerate(path.parts):
        if part.startswith(".") and _BUILDING in part:
            return Path(*path.parts[:i], part[1:].split(_BUILDING)[0], *path.parts[i + 1 :])
    return path


def _relocate(value: Any, tmp: Path, final: Path) -> Any:
    """`value` with every path inside the build folder `tmp` pointing into the published `final`.

    A stage's info and the summaries it writes name files in the folder it was built in; the
    folder is renamed on publication, so those names are rewritten (the JSON files at the
    folder's top level in place, before the rename) to say where the files are for good.
    """
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        for old in _build_names(tmp):
            value = value.replace(old, str(final))
        return value
    if isinstance(value, dict):
        return {k: _relocate(v, tmp, final) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relocate(v, tmp, final) for v in value]
    return value


def _build_names(tmp: Path) -> list[str]:
    """The spellings of the build folder's path, the longer first (one may contain the other)."""
    return sorted({str(tmp), str(tmp.resolve())}, key=len, reverse=True)


def _relocate_json_files(tmp: Path, final: Path) -> None:
    olds = _build_names(tmp)
    for path in tmp.glob("*.json"):  # top level only: files in sub-folders may carry identity hashes
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        new = text
        for old in olds:
            new = new.replace(json.dumps(old)[1:-1], json.dumps(str(final))[1:-1])
        if new != text:
            path.write_text(new, encoding="utf-8", errors="surrogateescape")


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # stage outputs --------------------------------------------------------------
    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def load_stage(self, stage: str, key: str) -> StageResult | None:
        record = self.stage_dir(stage, key) / STAGE_RECORD
        if not record.exists():
            return None
        result = StageResult.model_validate_json(record.read_text())
        if not all(Path(ref.path).exists() for ref in result.outputs.values()):
            return None
        return result

    def build_stage(
        self,
        stage: str,
        key: str,
        build: Callable[[Path], tuple[dict[str, Path], dict[str, Any]]],
    ) -> StageResult:
        """Run `build(tmp_dir)` and publish its folder as the output of (stage, key).

        `build` writes into the folder it is given and returns ({name: file inside it}, info).
        The folder appears under its final name only once complete.
        """
        final = self.stage_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{key}{_BUILDING}{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files, info = build(tmp)
            rel = {name: Path(p).resolve().relative_to(tmp.resolve()) for name, p in files.items()}
            info = _relocate(info, tmp, final)
            _relocate_json_files(tmp, final)
            if final.exists():  # an older or partial copy under the same key: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        outputs = {}
        for name, r in rel.items():
            p = final / r
            schema = _schema_of(p)
            rows = pq.ParquetFile(p).metadata.num_rows if p.suffix == ".parquet" else None
            outputs[name] = FileRef(path=str(p), sha256=sha256_file(p), rows=rows, schema_name=schema)
        result = StageResult(
            stage=stage,
            key=key,
            dir=str(final),
            outputs=outputs,
            info=info,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_json_atomic(final / STAGE_RECORD, result.model_dump(mode="json"))
        return result

    # runs ------------------------------------------------------------------------
    def new_run(self, flow: str) -> "RunFolder":
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-{flow}-{uuid.uuid4().hex[:6]}"
        return RunFolder(self.root / "runs" / run_id, run_id=run_id, flow=flow)

    def open_run(self, run_id: str) -> "RunFolder":
        run = RunFolder.open(self.root / "runs" / run_id)
        if run is None:
            raise FileNotFoundError(f"no run {run_id!r} in {self.root / 'runs'}")
        return run

    def runs(self) -> list["RunFolder"]:
        base = self.root / "runs"
        if not base.exists():
            return []
        found = [RunFolder.open(p) for p in sorted(base.iterdir()) if (p / "run.json").exists()]
        return [r for r in found if r is not None]


class RunFolder:
    """One pipeline run: which stage outputs it used and how each was obtained."""

    def __init__(self, path: Path, run_id: str, flow: str, record: dict | None = None):
        self.path = path
        self.run_id = run_id
        self.flow = flow
        self.record = record or {
            "run_id": run_id,
            "flow": flow,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stages": {},
            "status": "running",
        }
        self._t0 = time.perf_counter()

    @classmethod
    def open(cls, path: Path) -> "RunFolder | None":
        try:
            record = json.loads((path / "run.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(path, record["run_id"], record["flow"], record)

    def add_stage(self, result: StageResult, state: str, name: str | None = None) -> None:
        self.record["stages"][name or result.stage] = {
            "state": state,
            "key": result.key,
            "dir": result.dir,
            "outputs": {k: v.model_dump() for k, v in result.outputs.items()},
            "info": result.info,
        }
        self.save()

    def finish(self, status: str, **extra: Any) -> None:
        self.record["status"] = status
        self.record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.record["wall_s"] = round(time.perf_counter() - self._t0, 3)
        self.record.update(extra)
        self.save()

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / "run.json", self.record)


def _schema_of(path: Path) -> str | None:
    if path.suffix != ".parquet":
        return None
    meta = pq.read_schema(path).metadata or {}
    name = meta.get(b"saec.schema")
    return name.decode() if name else None


__all__ = [
    "FileRef",
    "RunFolder",
    "SCHEMAS",
    "StageResult",
    "Store",
    "atomic_path",
    "read_table",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_table",
    "pa",
]
