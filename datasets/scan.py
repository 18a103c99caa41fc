"""What the dataset readers share: the scan result, quarantine rows, parallel probing."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from saec.artifacts.hashing import sha256_file
from saec.datasets.images import BadImage, ImageInfo, probe_image
from saec.errors import ActionableError


class LayoutError(ActionableError, ValueError):
    """The folder does not have the layout the reader expects; the message says what to fix."""


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
    mask_path: str | None = None


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
        self.rows.append(
            {"path": str(path), "rel_path": rel, "dataset": self.dataset, "kind": kind, "reason": reason, "detail": detail}
        )

    def frame(self) -> pd.DataFrame:
        cols = ["path", "rel_path", "dataset", "kind", "reason", "detail"]
        return pd.DataFrame(self.rows, columns=cols)


def _probe_one(cand: Candidate, max_pixels: int) -> tuple[Candidate, ImageInfo | BadImage, str | None]:
    try:
        info = probe_image(cand.path, max_pixels)
    except BadImage as exc:
        return cand, exc, None
    except OSError as exc:
        return cand, BadImage(cand.path, "unreadable", str(exc)), None
    return cand, info, sha256_file(cand.path)


def probe_candidates(
    candidates: Iterable[Candidate],
    dataset: str,
    quarantine: Quarantine,
    max_pixels: int,
    workers: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Decode every candidate in parallel; good ones become rows, bad ones quarantine rows.

    Byte-identical files are one image: the first (train before test, then by path) is
    kept and each further copy is quarantined as a duplicate, naming the file it repeats.
    A row's `outside_root` says its file, links resolved, lies outside its candidate's root.
    """
    cands = sorted(candidates, key=lambda c: (c.split != "train", c.rel_path))
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    rows: list[dict] = []
    seen: dict[str, str] = {}
    real_roots: dict[Path, Path] = {}
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda c: _probe_one(c, max_pixels), cands)
        if progress:
            from rich.progress import track

            results = track(results, total=len(cands), description=f"reading {dataset}", transient=True)
        for cand, info, digest in results:
            if isinstance(info, BadImage):
                quarantine.add(cand.path, "image", info.reason, info.detail)
                continue
            if digest in seen:
                quarantine.add(cand.path, "image", "duplicate", f"same bytes as {seen[digest]}")
                continue
            seen[digest] = cand.rel_path
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
                    "mask_path": cand.mask_path,
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


def list_dir(path: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, files) of a folder, sorted; hidden entries are listed as files."""
    dirs, files = [], []
    for p in sorted(path.iterdir()):
        (dirs if p.is_dir() and not p.name.startswith(".") else files).append(p)
    return dirs, files
