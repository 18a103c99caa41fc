"""The artifact store: one folder per stage output, one folder per run, atomic writes.

Layout under the store root (git-ignored):

    stages/<stage>/<key>/          one finished stage output; <key> is its cache key
        _stage.json                what the stage wrote: outputs, every file with its size and hash
        *.parquet, ...
    stages/<stage>/.<key>.lock     held while that output is built (one builder per key)
    work/<stage>/<key>/            what a long stage keeps between attempts (training checkpoints),
                                   removed once its output is published
    runs/<run_id>/run.json         which stage outputs a run used, and whether each was built or reused

A stage output is built in a hidden temporary folder under its key's lock and renamed into
place, record included, when complete: a crash never leaves a half-written output under its
final name, and two processes building the same key build it once (the second waits and
reuses the first's). A hit is verified against its record before it is trusted: every file
present with its recorded size, and its content hash where that is cheap; a damaged output
is rebuilt. Tables are written to a temporary file and renamed the same way.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout
from pydantic import BaseModel, Field, ValidationError

from saec.artifacts.hashing import canonical_json, hash_obj, sha256_file
from saec.artifacts.remote import MIRROR_MARK, SHA256, ContentCache, ObjectStore, is_url, mirror_of, mirrored_url
from saec.artifacts.schemas import MEASURED_COLUMNS, SCHEMAS, conform
from saec.errors import ActionableError

STAGE_RECORD = "_stage.json"
RUN_RECORD = "run.json"
# Files up to this size are re-hashed when a cached output is verified; larger ones are checked by size.
VERIFY_HASH_BYTES = 16 << 20

log = logging.getLogger("saec.store")


class StoreError(ActionableError, RuntimeError):
    """The store cannot be used as asked (not writable, disk full, damaged); the message says what to do."""


class FileRef(BaseModel):
    """A file or folder an output holds: absolute path, content hash, rows for tables.

    `identity` is the hash of what the output means for the stages that read it: for a table
    with measured columns (timings), the table without them; otherwise the content hash.
    """

    path: str
    sha256: str
    rows: int | None = None
    schema_name: str | None = None
    identity: str | None = None

    def read(self) -> pd.DataFrame:
        return read_table(self.path)


OUTPUT_OF = "output_of"  # in a merge's info: the stage whose output the merge wrote from its shards'


class StageResult(BaseModel):
    """What a stage task returns: a small reference, never the data itself."""

    stage: str
    key: str
    dir: str
    outputs: dict[str, FileRef] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)
    created: str = ""
    code: str = ""  # code version of the stage that built it
    measurements: list[str] = Field(default_factory=list)  # outputs that record how the run went, not data
    build_s: float | None = None  # how long the build took (a fact about that run, not part of the output's identity)

    def table(self, name: str) -> pd.DataFrame:
        return read_table(self.outputs[name].path)

    def path(self, name: str) -> Path:
        return Path(self.outputs[name].path)

    def digest(self) -> str:
        """Content identity of this output: what it holds for the stages that read it. A merge of
        shards names the stage whose output it is, so that stages reading it see one identity."""
        held = {k: v.identity or v.sha256 for k, v in self.outputs.items() if k not in self.measurements}
        return hash_obj({"stage": self.output_of, "outputs": held})

    @property
    def output_of(self) -> str:
        """The stage whose output this is: its own, or for a merge the stage whose shards it merged."""
        return self.info.get(OUTPUT_OF) or self.stage


class ModelRef(BaseModel):
    """A model folder (or weights file) and its content hash; `source` names the stage output it
    lies in, if any ({stage, key, rel}), so a machine with its own copy of the store finds it there."""

    kind: str
    path: str
    sha256: str
    source: dict[str, str] | None = None


class DatasetRef(BaseModel):
    """A source dataset folder and the content hash of everything in it."""

    kind: str
    path: str
    sha256: str
    files: int


class _Record(StageResult):
    """The stage record on disk: the result plus every file of the folder (relative path -> entry)."""

    files: dict[str, dict[str, Any]] = Field(default_factory=dict)


# --------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files and folders of the store get the modes any new file gets (0666 / 0777 less the umask);
# the temporary names they are written under would otherwise leave them readable by their owner only.
_UMASK = _umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def _open_modes(folder: Path) -> None:
    """Give every file and folder under `folder` (not links) the store's modes: libraries that save
    through temporary files (safetensors, for one) leave them readable by their owner only."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), DIR_MODE)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), FILE_MODE)


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
        os.chmod(tmp_path, FILE_MODE)
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
    os.chmod(tmp, DIR_MODE)
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


def _table_identity(table: pa.Table, schema_name: str) -> str | None:
    """Hash of a table without its measured columns (None when it has none)."""
    measured = [c for c in MEASURED_COLUMNS.get(schema_name, ()) if c in table.column_names]
    if not measured:
        return None
    buf = io.BytesIO()
    pq.write_table(table.drop_columns(measured), buf, compression="zstd")
    return hash_obj({"table": schema_name, "bytes": hashlib.sha256(buf.getvalue()).hexdigest()})


def write_table(df: pd.DataFrame, schema_name: str, path: str | Path) -> FileRef:
    """Write `df` as Parquet with the declared schema `schema_name`, atomically."""
    table = conform(df, schema_name)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return FileRef(path=str(Path(path).resolve()), sha256=sha256_file(path), rows=table.num_rows,
                   schema_name=schema_name, identity=_table_identity(table, schema_name))  # fmt: skip


def read_table(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    return pq.read_table(path, columns=columns).to_pandas()


# --------------------------------------------------------------------------- build folders

_BUILDING = ".building-"
_DAMAGED = ".damaged-"


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


def _walk_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every file and link under `folder`, links not followed."""
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for name in sorted(filenames) + sorted(d for d in dirnames if (base / d).is_symlink()):
            p = base / name
            yield p.relative_to(folder).as_posix(), p
        dirnames[:] = sorted(d for d in dirnames if not (base / d).is_symlink())


def _file_entry(path: Path) -> dict[str, Any]:
    if path.is_symlink():
        return {"link": os.readlink(path)}
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _folder_hash(files: dict[str, dict[str, Any]], prefix: str) -> str:
    inside = {k[len(prefix):]: v for k, v in files.items() if k.startswith(prefix)}
    return hash_obj(inside)


def _problem(folder: Path, record: _Record) -> str | None:
    """Why the output in `folder` no longer matches its record (None when it does)."""
    for rel, entry in record.files.items():
        path = folder / rel
        if "link" in entry:
            if not path.is_symlink() or os.readlink(path) != entry["link"]:
                return f"{rel} is no longer the link it was"
            continue
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != entry["size"]:
            return f"{rel} has {size} bytes, {entry['size']} were written"
        if size <= VERIFY_HASH_BYTES and sha256_file(path) != entry["sha256"]:
            return f"{rel} has other content than was written"
    return None


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _checked(name: str, what: str) -> str:
    """A stage name or cache key, refused when it is not one (a run record read from a shared store
    names them, and they become folder names here)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise StoreError(f"{name!r} is not a {what} name of the artifact store (letters, digits, _ . -); "
                         "a run record that names it was altered")  # fmt: skip
    return name


def _unsafe(record: _Record, stage: str, key: str) -> str | None:
    """Why a record read from an object store must not be placed on this machine (None when it may):
    it is another key's, or a name in it would leave the output's folder, or an entry is neither a
    file of known content nor a link. Whoever can write to the bucket must not write elsewhere here."""
    if (record.stage, record.key) != (stage, key):
        return f"it describes {record.stage}/{record.key}"
    for rel, entry in record.files.items():
        if "\\" in rel or "\0" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
            return f"the file name {rel!r} leaves the output's folder"
        if "link" in entry:
            if not isinstance(entry["link"], str) or "\0" in entry["link"]:
                return f"{rel} is a link with no target"
        elif not (isinstance(entry.get("sha256"), str) and SHA256.match(entry["sha256"])
                  and isinstance(entry.get("size"), int) and entry["size"] >= 0):  # fmt: skip
            return f"{rel} has no content hash and size"
    named = list(record.files)
    for name, ref in record.outputs.items():
        path = PurePosixPath(ref.path)
        if not path.is_relative_to(record.dir) or ".." in path.parts:
            return f"its output {name} lies outside its folder"
        named.append(path.relative_to(record.dir).as_posix())
    links = {rel for rel, entry in record.files.items() if "link" in entry}
    for rel in named:
        under = [link for link in links if rel.startswith(f"{link}/")]
        if under:
            return f"{rel} lies under the link {under[0]}"
    return None


def _new_build_folder(final: Path, key: str) -> Path:
    """A hidden folder beside `final` to build (or fetch) its content in, named for this process."""
    tmp = final.parent / f".{key}{_BUILDING}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    return tmp


def _put_in_place(tmp: Path, final: Path, key: str) -> None:
    """Rename a finished folder to its final name; a folder there already (damaged, or replaced on
    purpose) is moved out of the way and removed first."""
    if final.exists() or final.is_symlink():
        aside = final.parent / f".{key}{_DAMAGED}{uuid.uuid4().hex[:6]}"
        os.replace(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(tmp, final)


def _describe_os_error(exc: OSError, what: str, root: Path) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left on the device of the artifact store {root} while {what}: "
                          "free some space (old runs under stages/ and work/ can go) or set store.root elsewhere")  # fmt: skip
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreError(f"the artifact store {root} is not writable ({exc.strerror}) while {what}: "
                          "make it writable, or copy it and set store.root to the copy")  # fmt: skip
    return StoreError(f"the artifact store {root} failed while {what}: {exc}")


def _store_problem(exc: OSError, root: Path) -> bool:
    """Whether an error while building is the store's: a full or read-only disk, or a file of the store refused."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    return exc.errno in (errno.EACCES, errno.EPERM) and any(Path(os.fsdecode(n)).absolute().is_relative_to(root) for n in names)


def _pid_alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.Error:
        return False


def _this_process() -> dict[str, Any]:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time()}


# --------------------------------------------------------------------------- the store

Build = Callable[[Path], tuple[dict[str, Path], dict[str, Any]]]


class Store:
    """A local folder, or an object store (`s3://bucket/prefix`) seen through this machine's mirror
    folder (`saec.artifacts.remote`). `root` is always the local folder the stages work in;
    `location` is what the user configured."""

    def __init__(self, root: str | Path):
        if is_url(root):
            self.url: str | None = str(root).rstrip("/")
            self.root = mirror_of(self.url)
            if not (self.root / MIRROR_MARK).is_file():
                try:
                    write_json_atomic(self.root / MIRROR_MARK, {"url": self.url})
                except OSError as exc:
                    raise _describe_os_error(exc, "creating this machine's mirror of the store", self.root) from None
        else:
            self.root = Path(root).resolve()
            self.url = mirrored_url(self.root)  # a mirror folder handed on as a path stays a mirror
        self.remote = ObjectStore(self.url) if self.url else None

    @property
    def location(self) -> str:
        return self.url or str(self.root)

    # files the stages read ----------------------------------------------------------
    def share_files(self, paths: "pd.Series | list[str]", shas: "pd.Series | list[str]") -> int:
        """Put source files (images a scan accepted) in the object store under their content hash,
        for workers on other machines; nothing to do for a local store. Returns how many were sent."""
        if self.remote is None:
            return 0
        return self.remote.put_blobs({sha: Path(p) for p, sha in zip(paths, shas)})

    def readable(self, paths: "pd.Series | list[str]", shas: "pd.Series | list[str]") -> list[str]:
        """Local files with the content of `paths` (whose sha256 are `shas`), to read: the paths
        themselves in a local store; from an object store, copies fetched by content into this
        machine's cache (only the ones asked for, each once), whatever machine the paths name."""
        if self.remote is None:
            return [str(p) for p in paths]
        items = [(str(sha), Path(str(p)).suffix) for p, sha in zip(paths, shas)]
        return [str(p) for p in ContentCache().fetch(self.remote, items)]

    # small documents (records other machines read) -----------------------------------
    def write_doc(self, rel: str, obj: Any) -> None:
        write_json_atomic(self.root / rel, obj)
        if self.remote is not None:
            self.remote.write(rel, (self.root / rel).read_bytes())

    def read_doc(self, rel: str) -> Any | None:
        """A JSON document written with `write_doc` (on any machine), or None."""
        if self.remote is not None:
            data = self.remote.read(rel)
        else:
            try:
                data = (self.root / rel).read_bytes()
            except OSError:
                data = None
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    # stage outputs --------------------------------------------------------------
    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / _checked(stage, "stage") / _checked(key, "key")

    def _lock(self, stage: str, key: str) -> FileLock:
        folder = self.stage_dir(stage, key).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _describe_os_error(exc, f"building stage {stage}", self.root) from None
        return FileLock(str(folder / f".{key}.lock"))

    def _read_record(self, stage: str, key: str) -> _Record | None:
        path = self.stage_dir(stage, key) / STAGE_RECORD
        try:
            record = _Record.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("stage %s: the record %s is unreadable (%s); the output is built again", stage, path, exc)
            return None
        return record

    def lookup(self, stage: str, key: str) -> StageResult | None:
        """The verified output of (stage, key), or None; a damaged one is reported and not returned.

        With an object store, its record there decides: the mirror's copy is used when it is that
        record's, and fetched from the object store otherwise."""
        return self._lookup(stage, key, held=False)

    def _lookup(self, stage: str, key: str, held: bool) -> StageResult | None:
        """`lookup`; `held`: this process holds the key's lock already (a second lock object on the
        same file would wait for the first forever)."""
        if self.remote is None:
            return self._lookup_local(stage, key)
        marker = self.remote.read(self._record_key(stage, key))
        if marker is None:
            return None
        if held:
            return self._lookup_local(stage, key, marker) or self._pull_locked(stage, key, marker)
        return self._lookup_local(stage, key, marker) or self._pull(stage, key, marker)

    @staticmethod
    def _record_key(stage: str, key: str) -> str:
        return f"stages/{_checked(stage, 'stage')}/{_checked(key, 'key')}/{STAGE_RECORD}"

    def _lookup_local(self, stage: str, key: str, marker: bytes | None = None) -> StageResult | None:
        folder = self.stage_dir(stage, key)
        if marker is not None:  # the mirror's copy counts only if it is the published record
            try:
                if (folder / STAGE_RECORD).read_bytes() != marker:
                    return None
            except OSError:
                return None
        record = self._read_record(stage, key)
        if record is None:
            return None
        problem = _problem(folder, record)
        if problem is not None:
            log.warning("stage %s: the cached output %s is damaged (%s); it is built again", stage, folder, problem)
            return None
        return _as_result(record, folder)

    def build_stage(self, stage: str, key: str, build: Build, *, measurements: tuple[str, ...] = (),
                    code: str = "") -> StageResult:  # fmt: skip
        """The output of (stage, key): the verified one in the store, or `build(tmp_dir)` published."""
        return self.get_or_build(stage, key, build, measurements=measurements, code=code)[0]

    def get_or_build(self, stage: str, key: str, build: Build, *, measurements: tuple[str, ...] = (),
                     code: str = "", replace: bool = False) -> tuple[StageResult, bool]:  # fmt: skip
        """(output, reused) of (stage, key): a verified hit, or `build(tmp_dir)` run under the key's lock.

        `build` writes into the folder it is given and returns ({name: file or folder inside it},
        info); every file it writes must lie under a declared output. Concurrent callers of one
        key wait for the lock; the later ones reuse what the first published. With `replace`,
        an existing output is replaced by a new build.
        """
        if not replace and (hit := self.lookup(stage, key)) is not None:
            return hit, True
        lock = self._lock(stage, key)
        try:
            with lock:
                if not replace and (hit := self._lookup(stage, key, held=True)) is not None:
                    return hit, True  # another process (or machine) built it while this one waited
                self._clear_leftovers(stage, key)
                built = self._build_locked(stage, key, build, measurements, code, replace)
                if built is None:  # another machine published this key first: its output is the one
                    marker = self.remote.read(self._record_key(stage, key)) if self.remote else None
                    if marker is None or (theirs := self._pull_locked(stage, key, marker)) is None:
                        raise StoreError(f"stage {stage}: the output {key} another machine published in "
                                         f"{self.location} cannot be read back; run again")  # fmt: skip
                    return theirs, True
                return built, False
        except OSError as exc:
            if not _store_problem(exc, self.root):
                raise  # the stage's own input (a dataset file, a model folder) could not be read
            raise _describe_os_error(exc, f"building stage {stage}", self.root) from None

    def _clear_leftovers(self, stage: str, key: str) -> None:
        """Build folders of this key left by dead processes (under the lock, no live builder has one)."""
        parent = self.root / "stages" / stage
        for p in parent.glob(f".{key}{_BUILDING}*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in parent.glob(f".{key}{_DAMAGED}*"):
            shutil.rmtree(p, ignore_errors=True)

    def _build_locked(self, stage: str, key: str, build: Build, measurements: tuple[str, ...], code: str,
                      replace: bool = False) -> StageResult | None:  # fmt: skip
        """Build and publish (stage, key); None when an object store already holds another build of it."""
        final = self.stage_dir(stage, key)
        tmp = _new_build_folder(final, key)
        t0 = time.perf_counter()
        try:
            files, info = build(tmp)
            build_s = round(time.perf_counter() - t0, 3)
            _open_modes(tmp)
            rel = {name: Path(p).resolve().relative_to(tmp.resolve()).as_posix() for name, p in files.items()}
            info = _relocate(info, tmp, final)
            _relocate_json_files(tmp, final)
            record = _record(stage, key, tmp, final, rel, info, measurements, code).model_copy(update={"build_s": build_s})
            write_json_atomic(tmp / STAGE_RECORD, record.model_dump(mode="json"))
            if self.remote is not None and not self._publish_remote(stage, key, tmp, record, replace):
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            _put_in_place(tmp, final, key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _as_result(record, final)

    def _publish_remote(self, stage: str, key: str, tmp: Path, record: "_Record", replace: bool) -> bool:
        """Upload a finished build: its files as blobs, then its record (the marker) last. False when
        the object store holds a record of this key already (and `replace` is not asked)."""
        assert self.remote is not None
        files = {e["sha256"]: tmp / rel for rel, e in record.files.items() if "link" not in e}
        self.remote.put_blobs(files)
        return self.remote.write(self._record_key(stage, key), (tmp / STAGE_RECORD).read_bytes(), create=not replace)

    def _pull(self, stage: str, key: str, marker: bytes) -> StageResult | None:
        try:
            with self._lock(stage, key):
                return self._lookup_local(stage, key, marker) or self._pull_locked(stage, key, marker)
        except OSError as exc:
            raise _describe_os_error(exc, f"fetching stage {stage} from {self.location}", self.root) from None

    def _pull_locked(self, stage: str, key: str, marker: bytes) -> StageResult:
        """Fetch the output a published record describes into the mirror (under the key's lock)."""
        assert self.remote is not None
        try:
            record = _Record.model_validate_json(marker)
            problem = _unsafe(record, stage, key)
        except ValidationError as exc:
            problem = f"not a stage record: {exc.errors()[0]['msg']}"
        if problem is not None:
            raise StoreError(f"stage {stage}: the record {self._record_key(stage, key)} in {self.location} is refused "
                             f"({problem}); delete that object to build the stage again")  # fmt: skip
        final = self.stage_dir(stage, key)
        self._clear_leftovers(stage, key)
        regular = {rel: e["sha256"] for rel, e in record.files.items() if "link" not in e}
        fetched = ContentCache().fetch(self.remote, [(sha, "") for sha in regular.values()])
        self._place(record, marker, final, key, dict(zip(regular, fetched)))
        problem = _problem(final, record)
        if problem is not None:
            raise StoreError(f"stage {stage}: the output {key} fetched from {self.location} does not match its record "
                             f"({problem}); delete {self._record_key(stage, key)} there to build the stage again")  # fmt: skip
        return _as_result(record, final)

    def _place(self, record: _Record, marker: bytes, final: Path, key: str, cached: dict[str, Path]) -> None:
        """Put the files of `record` in place as `final`: its regular files from `cached` (by name), its links."""
        tmp = _new_build_folder(final, key)
        try:
            for rel, src in cached.items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            for rel, e in record.files.items():
                if "link" in e:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(e["link"], tmp / rel)
            for ref in record.outputs.values():  # every file is placed: an output still absent is an empty folder
                out = tmp / Path(ref.path).relative_to(record.dir)
                if not out.exists() and not out.is_symlink():
                    out.mkdir(parents=True)
            write_bytes_atomic(tmp / STAGE_RECORD, marker)
            _open_modes(tmp)
            _put_in_place(tmp, final, key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def clear_leftovers(self) -> int:
        """Remove the build folders of dead processes anywhere in the store; return how many went."""
        removed = 0
        for folder in self.root.glob(f"stages/*/.*{_BUILDING}*"):
            key = folder.name[1:].split(_BUILDING)[0]
            lock = FileLock(str(folder.parent / f".{key}.lock"))
            try:
                with lock.acquire(timeout=0):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
            except (Timeout, OSError):
                continue  # a live builder holds it, or the store is read-only
        return removed

    def check_writable(self) -> None:
        """Fail with a one-line error if nothing can be written to the store (or its mirror here)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise _describe_os_error(exc, "starting a run", self.root) from None
        if self.remote is not None:
            probe = f".write-check-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
            self.remote.write(probe, b"")
            self.remote.delete(probe)

    # runs ------------------------------------------------------------------------
    def new_run(self, flow: str) -> "RunFolder":
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-{flow}-{uuid.uuid4().hex[:6]}"
        return RunFolder(self.root / "runs" / run_id, run_id=run_id, flow=flow, remote=self.remote)

    def _fetch_run(self, run_id: str) -> None:
        """Bring a run record of the object store into the mirror (where it differs)."""
        assert self.remote is not None
        data = self.remote.read(f"runs/{run_id}/{RUN_RECORD}")
        path = self.root / "runs" / run_id / RUN_RECORD
        if data is not None and (not path.is_file() or path.read_bytes() != data):
            write_bytes_atomic(path, data)

    def open_run(self, run_id: str) -> "RunFolder":
        if self.remote is not None and "/" not in run_id and run_id not in ("", ".", ".."):
            self._fetch_run(run_id)
        run = RunFolder.open(self.root / "runs" / run_id, remote=self.remote)
        if run is None:
            raise FileNotFoundError(f"no run {run_id!r} in {self.location}/runs")
        return run

    def runs(self) -> list["RunFolder"]:
        if self.remote is not None:
            names = self.remote.list("runs")
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(self._fetch_run, names))
        base = self.root / "runs"
        if not base.exists():
            return []
        found = [RunFolder.open(p, remote=self.remote) for p in sorted(base.iterdir()) if (p / RUN_RECORD).exists()]
        return [r for r in found if r is not None]

    def mark_interrupted(self) -> list[str]:
        """Runs of this host still marked running whose process is gone: marked interrupted; their ids."""
        marked = []
        host = socket.gethostname()
        for run in self.runs():
            rec = run.record
            if rec.get("status") == "running" and rec.get("host") == host and isinstance(rec.get("pid"), int) \
                    and not _pid_alive(rec["pid"], rec.get("pid_started")):  # fmt: skip
                rec["status"] = "interrupted"
                rec["error"] = rec.get("error") or "the process ended without finishing the run (killed or crashed)"
                try:
                    run.save()
                    marked.append(run.run_id)
                except OSError:
                    pass
        return marked


def _record(stage: str, key: str, tmp: Path, final: Path, rel: dict[str, str], info: dict,
            measurements: tuple[str, ...], code: str) -> _Record:  # fmt: skip
    """The stage record of a finished build folder; fails if the build wrote files it did not declare."""
    files = {r: _file_entry(p) for r, p in _walk_files(tmp) if r != STAGE_RECORD}
    declared = set(rel.values())
    undeclared = [r for r in files if r not in declared and not any(r.startswith(d + "/") for d in declared)]
    if undeclared:
        shown = ", ".join(undeclared[:5]) + (f" and {len(undeclared) - 5} more" if len(undeclared) > 5 else "")
        raise StoreError(f"stage {stage} wrote files it does not declare as outputs: {shown}")
    outputs = {}
    for name, r in rel.items():
        p = tmp / r
        if p.is_dir() and not p.is_symlink():
            outputs[name] = FileRef(path=str(final / r), sha256=_folder_hash(files, r + "/"))
            continue
        entry = files[r]
        schema = _schema_of(p)
        measured = schema in MEASURED_COLUMNS  # only those tables have an identity apart from their bytes
        outputs[name] = FileRef(
            path=str(final / r), sha256=entry.get("sha256") or hash_obj(entry),
            rows=pq.ParquetFile(p).metadata.num_rows if p.suffix == ".parquet" else None,
            schema_name=schema, identity=_table_identity(pq.read_table(p), schema) if measured else None,
        )  # fmt: skip
    return _Record(
        stage=stage, key=key, dir=str(final), outputs=outputs, info=info, code=code,
        measurements=sorted(m for m in measurements if m in outputs),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), files=files,
    )  # fmt: skip


def _as_result(record: _Record, folder: Path) -> StageResult:
    """The result a record describes, its paths pointing into `folder` where the output lies now."""
    old = record.dir
    outputs = {
        name: ref.model_copy(update={"path": str(folder / Path(ref.path).relative_to(old))}) if old != str(folder) else ref
        for name, ref in record.outputs.items()
    }
    data = record.model_dump(exclude={"files"})
    data.update(dir=str(folder), outputs=outputs)
    return StageResult.model_validate(data)


class RunFolder:
    """One pipeline run: which stage outputs it used and how each was obtained."""

    def __init__(self, path: Path, run_id: str, flow: str, record: dict | None = None, remote: ObjectStore | None = None):
        self.path = path
        self.remote = remote  # an object store the record is also written to
        self.run_id = run_id
        self.flow = flow
        self.record = record or {
            "run_id": run_id,
            "flow": flow,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stages": {},
            "status": "running",
            **_this_process(),
        }
        self._t0 = time.perf_counter()

    @classmethod
    def open(cls, path: Path, remote: ObjectStore | None = None) -> "RunFolder | None":
        """The run recorded in `path`; None if it holds no record; a run marked `damaged` if the record is broken."""
        try:
            text = (path / RUN_RECORD).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return cls._damaged(path, f"{RUN_RECORD} cannot be read: {exc}")
        try:
            record = json.loads(text)
            missing = [k for k in ("run_id", "flow", "stages") if k not in record]
        except (ValueError, TypeError) as exc:
            return cls._damaged(path, f"{RUN_RECORD} is not valid JSON: {exc}")
        if missing or not isinstance(record.get("stages"), dict):
            return cls._damaged(path, f"{RUN_RECORD} lacks {missing or ['a stages mapping']}")
        return cls(path, record["run_id"], record["flow"], record, remote=remote)

    @classmethod
    def _damaged(cls, path: Path, why: str) -> "RunFolder":
        record = {"run_id": path.name, "flow": "?", "stages": {}, "status": "damaged", "error": why}
        return cls(path, path.name, "?", record)

    def add_stage(self, result: StageResult, state: str, name: str | None = None, seconds: float | None = None) -> None:
        """Record a stage of this run: built here ("ran") or taken from the store ("cached"), with the
        seconds this run spent on it (None where the run did not time it alone) and the build's time.
        A stage run as shards is "partly cached" where some shards were built and others taken."""
        self.record["stages"][name or result.stage] = {
            "state": state,
            "seconds": None if seconds is None else round(seconds, 3),
            "build_s": result.build_s,
            "key": result.key,
            "dir": result.dir,
            "code": result.code,
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
        write_json_atomic(self.path / RUN_RECORD, self.record)
        if self.remote is not None:
            self.remote.write(f"runs/{self.path.name}/{RUN_RECORD}", (self.path / RUN_RECORD).read_bytes())


# --------------------------------------------------------------------------- inputs on this machine


def with_read_paths(store: str | Path, frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` (columns image_id, path), with a `read_path` column naming the files to read on this
    machine where that is not `path`: with an object store, the copies fetched by content. Tables
    a stage writes keep `path`; readers take `read_paths(frame)`."""
    st = Store(store)
    if st.remote is None or not len(frame):
        return frame
    return frame.assign(read_path=st.readable(frame["path"].astype(str), frame["image_id"].astype(str)))


def read_paths(frame: pd.DataFrame) -> list[str]:
    """The files to read for the rows of `frame`: `read_path` where `with_read_paths` set it, else `path`."""
    return list(frame["read_path" if "read_path" in frame.columns else "path"].astype(str))


def readable_jsonl(store: str | Path, path: str | Path, folder: Path) -> Path:
    """An SFT file (records with `image_id` and `image`) whose images can be read on this machine:
    the file itself with a local store; with an object store, a copy in `folder` naming the images
    fetched by content. Lines that are not such records are copied as they are (the reader reports them)."""
    st = Store(store)
    if st.remote is None:
        return Path(path)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records: dict[int, dict] = {}
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("image"), str) and isinstance(rec.get("image_id"), str):
            records[i] = rec
    local = st.readable([r["image"] for r in records.values()], [r["image_id"] for r in records.values()])
    for (i, rec), image in zip(records.items(), local):
        lines[i] = json.dumps({**rec, "image": image}, ensure_ascii=False)
    out = folder / f"{Path(path).stem}.here.jsonl"
    write_bytes_atomic(out, ("\n".join(lines) + "\n").encode())
    return out


def _schema_of(path: Path) -> str | None:
    if path.suffix != ".parquet":
        return None
    meta = pq.read_schema(path).metadata or {}
    name = meta.get(b"saec.schema")
    return name.decode() if name else None


__all__ = [
    "DatasetRef",
    "FileRef",
    "ModelRef",
    "RunFolder",
    "SCHEMAS",
    "StageResult",
    "Store",
    "StoreError",
    "atomic_path",
    "read_paths",
    "read_table",
    "readable_jsonl",
    "with_read_paths",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_table",
    "pa",
]
