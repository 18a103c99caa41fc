"""The artifact store on object storage: `store.root: s3://bucket/prefix` (any fsspec URL).

Every machine keeps a local mirror of the store (`$SAEC_HOME/stores/<name>-<hash>/`, laid out
like a local store) and works on files there; the object store is what the machines share.
Layout under the URL:

    blobs/<sha256>                       every file of every stage output, by content (written once)
    stages/<stage>/<key>/_stage.json     a stage output's record: its files by relative path and hash.
                                         Written last, and only if absent: it is the publication
                                         marker, and the first build of a key to write it wins
    runs/<run_id>/run.json               run records
    dispatch/<flow_run_id>.json          what a stage run on a work pool did, for the run that sent it

A reader trusts only a record it finds under `stages/`: it fetches the blobs the record names
into the mirror (each checked against its hash) and verifies the folder like a local hit. A
crash before the record is written leaves blobs that no record names and no output. Two
machines that build one key at once both finish; the later one finds the record written,
drops its build and uses the first. Images the stages read are blobs too (an image's id is
the hash of its bytes): a worker fetches only the images of its rows, into a local cache
keyed by content (`$SAEC_HOME/blobs/`).

Credentials come from the environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL for a server other than AWS, or a profile); nothing of them is written to
the store or its configuration.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from saec.artifacts.hashing import sha256_file
from saec.errors import ActionableError

MIRROR_MARK = ".saec-remote.json"  # in a mirror's root: the URL it mirrors
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}")
PARALLEL = 16  # requests in flight when many small objects move


class ObjectStoreError(ActionableError, RuntimeError):
    """The object store cannot be reached or used as configured; the message says what to do."""


def is_url(root: object) -> bool:
    """Whether a store root names an object store (a URL other than file://)."""
    return isinstance(root, str) and bool(_URL.match(root)) and not root.lower().startswith("file://")


def saec_home() -> Path:
    from saec.env import default_home

    return Path(os.environ.get("SAEC_HOME") or default_home()).expanduser().resolve()


def mirror_of(url: str) -> Path:
    """This machine's mirror folder of the store at `url`."""
    url = url.rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[1]).strip("-")[-48:]
    return saec_home() / "stores" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def mirrored_url(folder: Path) -> str | None:
    """The URL a local folder mirrors, when it is a mirror; None for a plain local store."""
    try:
        return json.loads((folder / MIRROR_MARK).read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _client_settings() -> tuple[tuple[str, str], ...]:
    """The environment the object store clients read (credentials, endpoint): one client per setting."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "FSSPEC_"))))


@lru_cache(maxsize=None)
def _filesystem(url: str, settings: tuple[tuple[str, str], ...] = ()):
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    try:
        # listings are not cached: other machines add objects at any time
        fs, base = fsspec.core.url_to_fs(url, use_listings_cache=False, skip_instance_cache=True)
    except ImportError as exc:
        raise ObjectStoreError(f"store.root={url}: the {protocol}:// client is not installed ({exc}); "
                               "install it: pip install 'saec[s3]' (s3fs) or the fsspec backend for that scheme") from None  # fmt: skip
    except ValueError as exc:
        raise ObjectStoreError(f"store.root={url}: {exc}; use a local folder or an s3://bucket/prefix URL") from None
    return fs, base.rstrip("/")


class ObjectStore:
    """The shared side of a store: blobs by content, records, small JSON documents."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.base = _filesystem(self.url, _client_settings())

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def _key(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def _failed(self, what: str, exc: BaseException) -> ObjectStoreError:
        return ObjectStoreError(
            f"the artifact store {self.url} failed while {what} ({type(exc).__name__}: {exc}): check that the "
            "bucket exists and that this machine's environment holds credentials that may read and write it "
            "(for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL for a server other than AWS)"
        )

    # small objects ---------------------------------------------------------------
    def read(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._key(rel))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - the clients raise many kinds; one message names the fix
            raise self._failed(f"reading {rel}", exc) from exc

    def write(self, rel: str, data: bytes, *, create: bool = False) -> bool:
        """Write an object; with `create`, only if none exists under that name (False if one does)."""
        try:
            if create:
                try:
                    self.fs.pipe_file(self._key(rel), data, mode="create")
                except FileExistsError:
                    return False
                except TypeError:  # a backend without exclusive writes: check, then write
                    if self.fs.exists(self._key(rel)):
                        return False
                    self.fs.pipe_file(self._key(rel), data)
                # A server that ignores the condition (If-None-Match) lets a later writer replace
                # this object: what is there now decides who published.
                return self.fs.cat_file(self._key(rel)) == data
            self.fs.pipe_file(self._key(rel), data)
            return True
        except ObjectStoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failed(f"writing {rel}", exc) from exc

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._key(rel))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._failed(f"deleting {rel}", exc) from exc

    def list(self, rel: str) -> list[str]:
        """Names directly under the prefix `rel` (empty when there is none)."""
        try:
            found = self.fs.ls(self._key(rel), detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._failed(f"listing {rel}", exc) from exc
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)

    # blobs -----------------------------------------------------------------------
    def missing_blobs(self, shas: Iterable[str]) -> list[str]:
        shas = sorted(set(shas))

        def absent(sha: str) -> bool:
            return not self.fs.exists(self._key(f"blobs/{sha}"))

        try:
            with ThreadPoolExecutor(PARALLEL) as pool:
                return [s for s, gone in zip(shas, pool.map(absent, shas)) if gone]
        except Exception as exc:  # noqa: BLE001
            raise self._failed("checking which files it holds", exc) from exc

    def put_blobs(self, files: dict[str, Path]) -> int:
        """Upload {sha256: local file} that the store lacks; return how many were sent."""
        todo = self.missing_blobs(files)
        if todo:
            try:
                self.fs.put([str(files[s]) for s in todo], [self._key(f"blobs/{s}") for s in todo])
            except Exception as exc:  # noqa: BLE001
                raise self._failed(f"uploading {len(todo)} files", exc) from exc
        return len(todo)

    def fetch_blobs(self, items: Sequence[tuple[str, Path]]) -> None:
        """Download [(sha256, destination)] where the destination is not there yet; each is checked
        against its hash and renamed into place, so a destination is complete or absent."""
        todo: dict[str, list[Path]] = {}
        for sha, dest in items:
            if not dest.exists():
                if not SHA256.match(sha):
                    raise ObjectStoreError(f"the artifact store {self.url} was asked for a file named {sha!r}, "
                                           "which is not a content hash")  # fmt: skip
                todo.setdefault(sha, []).append(dest)
        if not todo:
            return
        first = next(iter(todo.values()))[0]
        first.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=first.parent) as tmp:
            tmps = {s: Path(tmp) / s for s in todo}
            try:
                self.fs.get([self._key(f"blobs/{s}") for s in todo], [str(tmps[s]) for s in todo])
            except FileNotFoundError as exc:
                gone = [s for s in todo if not self.fs.exists(self._key(f"blobs/{s}"))] or ["?"]
                raise ObjectStoreError(
                    f"the artifact store {self.url} lacks {len(gone)} file(s) that a record or table names "
                    f"(e.g. blobs/{gone[0]}): it was damaged or pruned; build the stage that wrote them again "
                    "(delete its record under stages/), or use a new store.root"
                ) from exc
            except Exception as exc:  # noqa: BLE001
                raise self._failed(f"downloading {len(todo)} files", exc) from exc
            for sha, dests in todo.items():
                got = sha256_file(tmps[sha])
                if got != sha:
                    raise ObjectStoreError(f"the artifact store {self.url} holds blobs/{sha} with other content ({got}): "
                                           "the object was altered; delete it and build the stage that wrote it again")  # fmt: skip
                for dest in dests[1:]:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(tmps[sha], dest)
                dests[0].parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmps[sha], dests[0])


def _link_or_copy(src: Path, dst: Path) -> None:
    """Place `src` at `dst` (a hard link where the file system allows one), atomically."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class ContentCache:
    """Files fetched from object stores, named by content: `$SAEC_HOME/blobs/<sha[:2]>/<sha><suffix>`."""

    def __init__(self, root: Path | None = None):
        self.root = root or saec_home() / "blobs"

    def path(self, sha: str, suffix: str = "") -> Path:
        """Where the file of content `sha` lies here; `suffix` (a file type's, e.g. `.png`) is kept when
        it is a plain one."""
        if not SHA256.match(sha):
            raise ObjectStoreError(f"a table names the file {sha!r} to fetch by content, which is not a sha256: "
                                   "its image_id column was altered; prepare the data again")  # fmt: skip
        plain = suffix.lower() if _SUFFIX.fullmatch(suffix) else ""
        return self.root / sha[:2] / f"{sha}{plain}"

    def fetch(self, remote: ObjectStore, items: Sequence[tuple[str, str]]) -> list[Path]:
        """Local files of [(sha256, suffix)], in the order given: fetched where missing, and fetched
        again where the copy here no longer has its content (a file it was hard-linked as was edited)."""
        paths = [self.path(sha, suffix) for sha, suffix in items]
        with ThreadPoolExecutor(min(PARALLEL, os.cpu_count() or 1)) as pool:
            altered = [p for p, ok in zip(paths, pool.map(_holds, [sha for sha, _ in items], paths)) if not ok]
        for p in altered:
            p.unlink(missing_ok=True)
        remote.fetch_blobs([(sha, p) for (sha, _), p in zip(items, paths)])
        return paths


def _holds(sha: str, path: Path) -> bool:
    """Whether `path` is absent (to be fetched) or holds the content `sha`."""
    try:
        return sha256_file(path) == sha
    except FileNotFoundError:
        return True
