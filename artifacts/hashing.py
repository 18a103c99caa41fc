"""Content hashes: of files, of folders of files, of configs (code versions: saec.artifacts.code)."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, NamedTuple

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# Files at least this large have their hash remembered between processes (model weights: a 7B
# checkpoint is 15 GB), keyed by what changes whenever the bytes do: path, size, inode, and the
# modification and change times in nanoseconds (no tool can set the change time).
REMEMBER_HASH_BYTES = 64 << 20
_REMEMBERED: dict[str, str] | None = None


def _remembered_path() -> Path:
    home = os.environ.get("SAEC_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saec"
    return Path(home) / "file-hashes.json"


def sha256_file_cached(path: str | Path) -> str:
    """sha256 of a file; for a large one, remembered by its (path, size, inode, mtime, ctime)."""
    global _REMEMBERED
    st = os.stat(path)
    if st.st_size < REMEMBER_HASH_BYTES:
        return sha256_file(path)
    where = _remembered_path()
    if _REMEMBERED is None:
        try:
            _REMEMBERED = json.loads(where.read_text())
        except (OSError, ValueError):
            _REMEMBERED = {}
    ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_dev}:{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    if ident not in _REMEMBERED:
        _REMEMBERED[ident] = sha256_file(path)
        try:  # best effort: a lost entry only costs hashing the file again
            where.parent.mkdir(parents=True, exist_ok=True)
            tmp = where.with_name(f".{where.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_REMEMBERED))
            os.replace(tmp, where)
        except OSError:
            pass
    return _REMEMBERED[ident]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace; paths and sets become plain values."""

    def default(o: Any) -> Any:
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        if hasattr(o, "model_dump"):
            return o.model_dump(mode="json")
        raise TypeError(f"cannot hash a {type(o).__name__} into a cache key")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


def hash_obj(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


def tree_files(root: Path) -> list[Path]:
    """Every regular file under root (following no links out of it), sorted by relative path."""
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def hash_tree(root: str | Path, files: Iterable[Path] | None = None) -> str:
    """A folder's content hash: relative paths and file bytes, order-independent of the file system."""
    root = Path(root)
    h = hashlib.sha256()
    for path in files if files is not None else tree_files(root):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(path).encode())
        h.update(b"\n")
    return h.hexdigest()


class TreeEntry(NamedTuple):
    """One entry of a walk that follows links (see `follow_tree`)."""

    rel: str  # path relative to the root as the walk reached it (posix, undecodable bytes surrogate-escaped)
    path: str | None  # the file to read (through any links); None where the entry is a marker only
    note: str  # "" for a plain file; where a linked file resolves to; or what the marker says


def follow_tree(root: str | Path) -> list[TreeEntry]:
    """Every file under root as a reader that follows links sees it, sorted by relative path.

    Symlinked folders are entered and symlinked files are read through. A folder whose real
    path is on the current walk path (a link loop) or was already entered through another
    path is not entered again: it becomes a marker naming where it was seen. Broken links and
    unreadable entries become markers too; fifos, sockets and devices are skipped. A file
    reached through a link notes where it resolves to: its relative path when that lies
    inside the root, "(outside the root)" otherwise (so the note holds no absolute path).
    """
    root_s = os.fspath(root)
    root_real = os.path.realpath(root_s)
    out: list[TreeEntry] = []
    entered: dict[str, str] = {root_real: "."}
    on_path: dict[str, str] = {}

    def where(real: str) -> str:
        rel = os.path.relpath(real, root_real)
        return "(outside the root)" if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel.replace(os.sep, "/")

    def visit(dir_path: str, dir_rel: str, dir_real: str) -> None:
        on_path[dir_real] = dir_rel or "."
        try:
            with os.scandir(dir_path) as it:
                items = sorted((e.name, e.path, e.is_symlink()) for e in it)
        except OSError as exc:
            out.append(TreeEntry(dir_rel or ".", None, f"unreadable folder: {exc.strerror}"))
            items = []
        for name, path, is_link in items:
            rel = f"{dir_rel}/{name}" if dir_rel else name
            try:
                mode = os.stat(path).st_mode  # follows links
            except OSError as exc:
                if is_link:
                    try:
                        out.append(TreeEntry(rel, None, f"broken link -> {os.readlink(path)}"))
                    except OSError:
                        out.append(TreeEntry(rel, None, "broken link"))
                else:
                    out.append(TreeEntry(rel, None, f"unreadable: {exc.strerror}"))
                continue
            real = os.path.realpath(path) if is_link else os.path.join(dir_real, name)
            if stat.S_ISDIR(mode):
                if real in on_path:
                    out.append(TreeEntry(rel, None, f"link loop -> {on_path[real]}"))
                elif real in entered:
                    out.append(TreeEntry(rel, None, f"same folder as {entered[real]}"))
                else:
                    entered[real] = rel
                    visit(path, rel, real)
            elif stat.S_ISREG(mode):
                plain = real == os.path.join(root_real, *rel.split("/"))
                out.append(TreeEntry(rel, path, "" if plain else f"-> {where(real)}"))
        del on_path[dir_real]

    visit(root_s, "", root_real)
    out.sort(key=lambda e: e.rel)
    return out


def _digest_or_error(path: str) -> str:
    try:
        return sha256_file_cached(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def hash_followed_tree(root: str | Path, workers: int | None = None) -> tuple[str, int]:
    """(content hash, files read) of a folder as readers that follow links see it.

    Each file of `follow_tree` adds its relative path and the sha256 of the bytes read through
    any links (and, where it was reached through a link, where it resolves to); each marker
    adds its relative path and what it says (broken link -> target, link loop, ...). For a
    tree of regular files without links the hash equals `hash_tree`'s. Paths are encoded with
    os.fsencode, so file names that are not UTF-8 hash too. Files are hashed in parallel.
    """
    entries = follow_tree(root)
    paths = [e.path for e in entries if e.path is not None]
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    if len(paths) > 1 and workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            digests = iter(list(pool.map(_digest_or_error, paths)))
    else:
        digests = iter([_digest_or_error(p) for p in paths])
    h = hashlib.sha256()
    for e in entries:
        h.update(os.fsencode(e.rel))
        h.update(b"\0")
        if e.path is not None:
            h.update(next(digests).encode())
            if e.note:
                h.update(b"\0")
                h.update(os.fsencode(e.note))
        else:
            h.update(os.fsencode(e.note))
        h.update(b"\n")
    return h.hexdigest(), len(paths)
