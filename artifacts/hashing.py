"""Content hashes: of files, of folders of files, of configs and of code."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from pathlib import Path
from typing import Any, Iterable

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


def code_version(*modules: str) -> str:
    """Hash of the source text of the named modules: a stage's code version."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        module = importlib.import_module(name)
        h.update(name.encode())
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:16]
