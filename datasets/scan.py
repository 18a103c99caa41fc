"""What the dataset readers share: the scan result, quarantine rows, parallel probing."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from saec.artifacts.hashing import sha256_file
from saec.datasets.images import BadImage, ImageInfo, mask_array, probe_image
from saec.errors import ActionableError


class LayoutError(ActionableError, ValueError):
    """The folder does not have the layout the reader expects; the message says what to fix."""


def printable(path: str | Path) -> str:
    """A path as text that can be stored: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def decodable(path: Path) -> bool:
    """Whether a file name is UTF-8 text (a table can hold it, and every later stage can open it by it)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Candidate:
    """An image file the layout says is a sample, with what the layout tells about it."""

    path: Path
    rel_path: str
    label: int
    category: str
    defect_type: str
    split: str
    root: Path  # the dataset root the layout was read from (rel_path is relative to it)
    mask_path: str | None = None  # as found under the root (links not resolved)


@dataclass
class ScanResult:
    images: pd.DataFrame  # schema "source_images"
    quarantine: pd.DataFrame  # schema "quarantine"
    notes: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {"images": len(self.images), "quarantined": len(self.quarantine)}
        if len(self.images):
            out["good"] = int((self.images.label == 0).sum())
            out["defect"] = int((self.images.label == 1).sum())
        if len(self.quarantine):
            for reason, n in self.quarantine.reason.value_counts().sort_index().items():
                out[f"quarantined:{reason}"] = int(n)
        out.update(self.notes)
        return out


class Quarantine:
    def __init__(self, dataset: str, root: Path):
        self.dataset = dataset
        self.root = root
        self.rows: list[dict] = []

    def add(self, path: Path, kind: str, reason: str, detail: str = "") -> None:
        try:
            rel = path.relative_to(self.root).as_posix()
        except ValueError:
            rel = str(path)
        self.rows.append({"path": printable(path), "rel_path": printable(rel), "dataset": self.dataset, "kind": kind,
                          "reason": reason, "detail": printable(detail)})  # fmt: skip

    def frame(self) -> pd.DataFrame:
        cols = ["path", "rel_path", "dataset", "kind", "reason", "detail"]
        return pd.DataFrame(self.rows, columns=cols)


def _probe_one(cand: Candidate, max_pixels: int, check_mask: bool):
    """(candidate, ImageInfo or BadImage, sha256, mask verdict); the verdict: None without a mask to
    check, "ok", "empty", or a BadImage saying why the mask cannot be used."""
    try:
        info = probe_image(cand.path, max_pixels)
    except BadImage as exc:
        return cand, exc, None, None
    except OSError as exc:
        return cand, BadImage(cand.path, "unreadable", str(exc)), None, None
    mask = None
    if check_mask and cand.mask_path is not None:
        mask = _check_mask(Path(cand.mask_path), info, max_pixels)
    return cand, info, sha256_file(cand.path), mask


def _check_mask(path: Path, image: ImageInfo, max_pixels: int) -> str | BadImage:
    try:
        arr = mask_array(path, max_pixels)
    except BadImage as exc:
        return BadImage(path, "mask_unreadable", f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason)
    if arr.shape != (image.height, image.width):
        return BadImage(path, "mask_size_mismatch", f"mask {arr.shape[1]}x{arr.shape[0]} vs image {image.width}x{image.height}")
    return "ok" if arr.any() else "empty"


def probe_candidates(
    candidates: Iterable[Candidate],
    dataset: str,
    quarantine: Quarantine,
    max_pixels: int,
    workers: int | None = None,
    progress: bool = False,
    check_masks: bool = False,
    notes: dict[str, int] | None = None,
) -> pd.DataFrame:
    """Decode every candidate in parallel; good ones become rows, bad ones quarantine rows.

    Byte-identical files are one image: the first (train before test, then by path) is
    kept and each further copy is quarantined as a duplicate, naming the file it repeats.
    A row's `outside_root` says its file, links resolved, lies outside its candidate's root.
    With `check_masks`, each candidate's mask is decoded too: one that cannot be read or has
    another size than its image is quarantined (the image stays, without a mask), and a
    defect whose mask is empty is counted in `notes["defect_with_empty_mask"]`.
    """
    cands = sorted(candidates, key=lambda c: (c.split != "train", c.rel_path))
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    rows: list[dict] = []
    seen: dict[str, str] = {}
    real_roots: dict[Path, Path] = {}
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda c: _probe_one(c, max_pixels, check_masks), cands)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(cands), desc=f"reading {dataset}", unit="file", leave=False,
                           dynamic_ncols=True)
        for cand, info, digest, mask in results:
            if isinstance(info, BadImage):
                quarantine.add(cand.path, "image", info.reason, info.detail)
                if cand.mask_path is not None:
                    quarantine.add(Path(cand.mask_path), "mask", "image_quarantined", f"the mask of {cand.rel_path}")
                continue
            if digest in seen:
                quarantine.add(cand.path, "image", "duplicate", f"same bytes as {seen[digest]}")
                if cand.mask_path is not None:
                    quarantine.add(Path(cand.mask_path), "mask", "image_quarantined", f"the mask of {cand.rel_path}")
                continue
            seen[digest] = cand.rel_path
            if isinstance(mask, BadImage):
                quarantine.add(Path(cand.mask_path), "mask", mask.reason, mask.detail)
                cand.mask_path = None
            elif mask == "empty" and cand.label == 1 and notes is not None:
                notes["defect_with_empty_mask"] = notes.get("defect_with_empty_mask", 0) + 1
            real = cand.path.resolve()  # a link led outside the root if this is not under the root's real path
            if cand.root not in real_roots:
                real_roots[cand.root] = cand.root.resolve()
            rows.append(
                {
                    "image_id": digest,
                    "path": str(real),
                    "rel_path": cand.rel_path,
                    "dataset": dataset,
                    "label": cand.label,
                    "category": cand.category,
                    "defect_type": cand.defect_type,
                    "split": cand.split,
                    "mask_path": None if cand.mask_path is None else str(Path(cand.mask_path).resolve()),
                    "width": info.width,
                    "height": info.height,
                    "mode": info.mode,
                    "format": info.format,
                    "bytes": info.bytes,
                    "outside_root": not real.is_relative_to(real_roots[cand.root]),
                }
            )
    cols = [
        "image_id", "path", "rel_path", "dataset", "label", "category", "defect_type",
        "split", "mask_path", "width", "height", "mode", "format", "bytes", "outside_root",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def list_dir(path: Path, quarantine: Quarantine | None = None) -> tuple[list[Path], list[Path]]:
    """(sub-folders, files) of a folder, sorted; hidden entries are listed as files.

    With `quarantine`, an entry whose name is not UTF-8 is quarantined (`undecodable_name`)
    and left out: no table can name it and no later stage could open it by that name.
    """
    dirs, files = [], []
    for p in sorted(path.iterdir(), key=lambda q: os.fsencode(q.name)):
        if quarantine is not None and not decodable(p):
            kind = "folder" if p.is_dir() else "image"
            quarantine.add(p, kind, "undecodable_name", "the name is not UTF-8 text: rename it (e.g. with convmv)")
            continue
        (dirs if p.is_dir() and not p.name.startswith(".") else files).append(p)
    return dirs, files


def ambiguous(files: Iterable[Path], key) -> tuple[dict, list[list[Path]]]:
    """({key: file} of the files whose key is unique, [groups of files that share a key])."""
    groups: dict = {}
    for f in files:
        groups.setdefault(key(f), []).append(f)
    return {k: g[0] for k, g in groups.items() if len(g) == 1}, [g for g in groups.values() if len(g) > 1]
