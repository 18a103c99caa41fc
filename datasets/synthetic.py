"""Seeded synthetic images in the exact MVTec AD and KolektorSDD2 folder layouts.

The embedded default of the pipeline runs on these folders through the same readers,
training and scoring code as the real datasets. Layouts written:

    <root>/mvtec_ad/<category>/train/good/000.png
    <root>/mvtec_ad/<category>/test/good/000.png
    <root>/mvtec_ad/<category>/test/<defect_type>/000.png
    <root>/mvtec_ad/<category>/ground_truth/<defect_type>/000_mask.png
    <root>/ksdd2/train/10000.png   beside  <root>/ksdd2/train/10000_GT.png
    <root>/ksdd2/test/20000.png    beside  <root>/ksdd2/test/20000_GT.png

Masks are 8-bit L images, 0 for background and 255 for defect, of the image's size.
KolektorSDD2 goods carry an all-zero mask, as in the real set.

Every image is a pure function of (seed, dataset, category, split, type, index): each
one draws from its own `numpy.random.Generator` seeded by a `SeedSequence` with that
key, so the bytes written do not depend on thread scheduling, on the other counts in
the config, or on any global random state.

A defect is rendered as a change to a defect-free scene. The mask is exactly the set
of changed pixels (a change above `_DIFF_THRESHOLD` grey levels, closed by a 5x5
ellipse); pixels outside the mask are restored to the defect-free scene bit for bit.
A defect too small or too faint to be seen (fewer than half the minimum area changed by
`_VISIBLE_LEVELS` grey levels) is drawn again from the same stream.

See `drawing.py` for how `SyntheticConfig.defect_visibility` scales defects and `renderers.py`
for the categories.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from saec.datasets.drawing import Visibility
from saec.datasets.renderers import (  # noqa: F401  (the registry is part of this module's interface)
    CATEGORIES,
    DEFAULT_CATEGORIES,
    KSDD2_MODE,
    WORLD_CATEGORIES,
    CategorySpec,
    _render_ksdd2,
)

log = logging.getLogger(__name__)

Array = np.ndarray
_PNG_COMPRESS = 1  # fixed zlib level: identical pixels give identical bytes
_DIFF_THRESHOLD = 2  # grey levels; a larger change at a pixel puts it in the mask
_KSDD2_FIRST_ID = {"train": 10000, "test": 20000}
_MAX_ATTEMPTS = 12
_VISIBLE_LEVELS = 8  # a defect needs at least min_area / 2 pixels changed by this many grey levels


class SyntheticConfig(BaseModel):
    """What the synthetic datasets hold. Counts are per category (MVTec) or per split (KSDD2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(2025, ge=0, description="root of every image's random stream")
    mvtec_size: int = Field(256, ge=64, le=1024, description="side of the square MVTec-layout images")
    ksdd2_size: tuple[int, int] = Field((116, 320), description="(width, height) of KolektorSDD2-layout images")
    categories: list[str] = Field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    n_train_good: int = Field(40, ge=1, le=100_000)
    n_test_good: int = Field(20, ge=1, le=100_000)
    n_test_defect_per_type: int = Field(10, ge=1, le=100_000)
    ksdd2_n_train: int = Field(160, ge=2, le=1_000_000)
    ksdd2_n_test: int = Field(80, ge=2, le=1_000_000)
    ksdd2_defect_rate: float = Field(0.25, gt=0.0, lt=1.0)
    defect_visibility: float = Field(
        1.0, ge=0.25, le=8.0,
        description="scales every defect's size and contrast from the same random draws; 1.0 is the reference look",
    )

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"categories is empty; choose from {sorted(CATEGORIES)}")
        unknown = [c for c in value if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; known categories are {sorted(CATEGORIES)}")
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"categories listed more than once: {dupes}")
        return value

    @field_validator("ksdd2_size")
    @classmethod
    def _ksdd2_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        w, h = value
        if not (32 <= w <= 2048 and 32 <= h <= 4096):
            raise ValueError(f"ksdd2_size (width, height) = {value} must lie within 32..2048 x 32..4096")
        return value

    def ksdd2_n_defect(self, split: Literal["train", "test"]) -> int:
        """Defective images in a KSDD2 split: rate x count, rounded, keeping one of each class."""
        n = self.ksdd2_n_train if split == "train" else self.ksdd2_n_test
        return int(min(max(round(n * self.ksdd2_defect_rate), 1), n - 1))


@dataclass(frozen=True)
class SyntheticSample:
    """A rendered image, its mask (None for MVTec goods) and the same scene without the defect."""

    image: Array  # uint8, HxW (L) or HxWx3 (RGB)
    clean: Array  # uint8, same shape: the scene before the defect was applied
    mask: Array | None  # uint8 HxW, 0 / 255


def _finish(rng: np.random.Generator, clean: Array, defect: Array | None, min_area: int) -> SyntheticSample | None:
    """Add sensor noise, quantise, and derive the mask from the pixels the defect changed."""
    assert clean.dtype == np.float32 and (defect is None or defect.dtype == np.float32), "renderers work in float32"
    noise = rng.standard_normal(clean.shape[:2], dtype=np.float32)
    noise *= np.float32(rng.uniform(0.8, 2.2))
    if clean.ndim == 3:
        noise = noise[..., None]

    def quantise(scene: Array) -> Array:
        x = scene + noise
        np.rint(x, out=x)
        np.clip(x, 0, 255, out=x)
        return x.astype(np.uint8)

    clean_u8 = quantise(clean)
    if defect is None:
        return SyntheticSample(image=clean_u8, clean=clean_u8, mask=None)
    defect_u8 = quantise(defect)
    diff = np.abs(defect_u8.astype(np.int16) - clean_u8.astype(np.int16))
    if diff.ndim == 3:
        diff = diff.max(axis=2)
    changed = (diff > _DIFF_THRESHOLD).astype(np.uint8)
    mask = cv2.morphologyEx(changed, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    if int(mask.sum()) < min_area or int((diff >= _VISIBLE_LEVELS).sum()) < max(min_area // 2, 3):
        return None  # too small or too faint to be seen: the caller draws another defect
    keep = mask.astype(bool)
    image = np.where(keep[..., None] if clean_u8.ndim == 3 else keep, defect_u8, clean_u8)
    return SyntheticSample(image=image, clean=clean_u8, mask=(mask * 255).astype(np.uint8))


def render_mvtec_sample(
    category: str, defect_type: str | None, rng: np.random.Generator, size: int = 256, visibility: float = 1.0
) -> SyntheticSample:
    """Render one MVTec-layout image of `category`; `defect_type` None (or "good") renders a good one.

    `visibility` scales the defect's size and contrast (see `Visibility`); goods do not depend on it.
    """
    vis = Visibility(visibility)
    spec = _spec(category)
    if defect_type == "good":
        defect_type = None
    if defect_type is not None and defect_type not in spec.defect_types:
        raise ValueError(f"category {category!r} has no defect type {defect_type!r}; it has {list(spec.defect_types)}")
    min_area = max(int(12 * (size / 256) ** 2), 4)
    for _ in range(_MAX_ATTEMPTS):
        clean, defect = spec.render(rng, size, defect_type, vis)
        sample = _finish(rng, clean, defect, min_area)
        if sample is not None:
            return sample
    raise RuntimeError(f"{category}/{defect_type}: no visible defect after {_MAX_ATTEMPTS} attempts")


def render_ksdd2_sample(
    defective: bool, rng: np.random.Generator, size: tuple[int, int] = (116, 320), visibility: float = 1.0
) -> SyntheticSample:
    """Render one KolektorSDD2-layout surface of `size` (width, height); goods get an all-zero mask.

    `visibility` scales the defect's size and contrast (see `Visibility`); goods do not depend on it.
    """
    vis = Visibility(visibility)
    w, h = size
    min_area = max(int(6 * (w / 116) ** 2), 3)
    for _ in range(_MAX_ATTEMPTS):
        clean, defect = _render_ksdd2(rng, w, h, defective, vis)
        sample = _finish(rng, clean, defect, min_area)
        if sample is not None:
            if sample.mask is None:
                return SyntheticSample(sample.image, sample.clean, np.zeros((h, w), np.uint8))
            return sample
    raise RuntimeError(f"ksdd2: no visible defect after {_MAX_ATTEMPTS} attempts")


def _spec(category: str) -> CategorySpec:
    try:
        return CATEGORIES[category]
    except KeyError:
        raise ValueError(f"unknown category {category!r}; known categories are {sorted(CATEGORIES)}") from None


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def sample_rng(seed: int, *parts: str | int) -> np.random.Generator:
    """The random stream of one image, keyed by its identity (strings hashed with CRC-32)."""
    key = tuple(p if isinstance(p, int) else _key(p) for p in parts)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass(frozen=True)
class _Job:
    parts: tuple[str | int, ...]  # identity of the image's random stream
    image_path: Path
    mask_path: Path | None
    run: Callable[[np.random.Generator], SyntheticSample]


def _write_png(path: Path, arr: Array) -> None:
    """8-bit grey or RGB PNG with a fixed zlib level (OpenCV's encoder: about 25 % faster than Pillow's)."""
    pixels = arr[..., ::-1] if arr.ndim == 3 else arr  # OpenCV takes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(pixels), [cv2.IMWRITE_PNG_COMPRESSION, _PNG_COMPRESS])
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def _execute(seed: int, job: _Job) -> None:
    sample = job.run(sample_rng(seed, *job.parts))
    _write_png(job.image_path, sample.image)
    if job.mask_path is not None:
        if sample.mask is None:
            raise RuntimeError(f"{job.image_path}: a mask was due but none was rendered")
        _write_png(job.mask_path, sample.mask)


def _run_jobs(seed: int, jobs: list[_Job], workers: int | None, progress: bool, label: str) -> None:
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results: Iterator[None] = pool.map(lambda j: _execute(seed, j), jobs)
        if progress:
            from tqdm.auto import tqdm

            for _ in tqdm(results, total=len(jobs), desc=label, unit="img", leave=False, dynamic_ncols=True):
                pass
        else:
            for _ in results:
                pass


def _prepare_target(root: Path, overwrite: bool) -> Path:
    """A fresh staging folder beside `root`; the finished layout is moved onto `root` at the end."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} is not empty; pass overwrite=True to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _run_jobs_into(staging: Path, root: Path, seed: int, jobs: list[_Job], workers: int | None, progress: bool,
                   label: str) -> None:
    """Render every job into `staging`, then move it onto `root`; a failure leaves `root` untouched."""
    try:
        _run_jobs(seed, jobs, workers, progress, label)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)


def generate_mvtec(root: str | Path, cfg: SyntheticConfig, *, overwrite: bool = False, progress: bool = False,
                   workers: int | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """Write the MVTec AD layout under `root`; returns {category: {split: {type: count}}}."""
    root = Path(root)
    started = time.perf_counter()
    staging = _prepare_target(root, overwrite)
    s = cfg.mvtec_size
    jobs: list[_Job] = []
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for cat in cfg.categories:
        spec = _spec(cat)
        plan = [("train", "good", cfg.n_train_good), ("test", "good", cfg.n_test_good)]
        plan += [("test", d, cfg.n_test_defect_per_type) for d in spec.defect_types]
        counts[cat] = {"train": {}, "test": {}}
        for split, dtype, n in plan:
            folder = staging / cat / split / dtype
            folder.mkdir(parents=True)
            mask_folder = None if dtype == "good" else staging / cat / "ground_truth" / dtype
            if mask_folder is not None:
                mask_folder.mkdir(parents=True)
            defect = None if dtype == "good" else dtype

            def run(rng: np.random.Generator, cat: str = cat, defect: str | None = defect) -> SyntheticSample:
                return render_mvtec_sample(cat, defect, rng, s, cfg.defect_visibility)

            for i in range(n):
                jobs.append(_Job(
                    parts=("mvtec_ad", cat, split, dtype, i),
                    image_path=folder / f"{i:03d}.png",
                    mask_path=None if mask_folder is None else mask_folder / f"{i:03d}_mask.png",
                    run=run,
                ))
            counts[cat][split][dtype] = n
    _run_jobs_into(staging, root, cfg.seed, jobs, workers, progress, "synthetic MVTec AD")
    log.info("wrote %d MVTec-layout images to %s in %.1f s", len(jobs), root, time.perf_counter() - started)
    return counts


def generate_ksdd2(root: str | Path, cfg: SyntheticConfig, *, overwrite: bool = False, progress: bool = False,
                   workers: int | None = None) -> dict[str, dict[str, int]]:
    """Write the KolektorSDD2 raw layout under `root`; returns {split: {"good": n, "defect": m}}."""
    root = Path(root)
    started = time.perf_counter()
    staging = _prepare_target(root, overwrite)
    jobs: list[_Job] = []
    counts: dict[str, dict[str, int]] = {}
    for split, n in (("train", cfg.ksdd2_n_train), ("test", cfg.ksdd2_n_test)):
        folder = staging / split
        folder.mkdir()
        n_def = cfg.ksdd2_n_defect(split)  # type: ignore[arg-type]
        order = sample_rng(cfg.seed, "ksdd2", split, "labels").permutation(n)
        defective = np.zeros(n, bool)
        defective[order[:n_def]] = True
        for i in range(n):
            stem = f"{_KSDD2_FIRST_ID[split] + i:05d}"

            def run(rng: np.random.Generator, d: bool = bool(defective[i])) -> SyntheticSample:
                return render_ksdd2_sample(d, rng, cfg.ksdd2_size, cfg.defect_visibility)

            jobs.append(_Job(("ksdd2", split, i), folder / f"{stem}.png", folder / f"{stem}_GT.png", run))
        counts[split] = {"good": n - n_def, "defect": n_def}
    _run_jobs_into(staging, root, cfg.seed, jobs, workers, progress, "synthetic KolektorSDD2")
    log.info("wrote %d KolektorSDD2-layout images to %s in %.1f s", len(jobs), root, time.perf_counter() - started)
    return counts


def generate_all(root: str | Path, cfg: SyntheticConfig, *, overwrite: bool = False, progress: bool = False,
                 workers: int | None = None) -> dict[str, Any]:
    """Write `root/mvtec_ad` and `root/ksdd2`; returns {"mvtec_ad": ..., "ksdd2": ...} counts."""
    root = Path(root)
    return {
        "mvtec_ad": generate_mvtec(root / "mvtec_ad", cfg, overwrite=overwrite, progress=progress, workers=workers),
        "ksdd2": generate_ksdd2(root / "ksdd2", cfg, overwrite=overwrite, progress=progress, workers=workers),
    }
