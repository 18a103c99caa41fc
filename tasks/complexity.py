"""Scene complexity, exactly as the SAEC scripts compute it (SEED-ALGORITHMS section 4).

Every image is decoded (8-bit, as the edge reads it), converted to grey (OpenCV's BT.601
weights) and resized to a `cpx_size` x `cpx_size` square (OpenCV bilinear, its default).
On that grey square:

    H = entropy of the 256-bin grey histogram (natural log) / ln 256          in [0, 1]
    E = mean of the Canny(64, 128) edge map, whose values are 0 or 255          in [0, 255]
    L = variance of the Laplacian (3x3 aperture, float64)
    G = mean Sobel gradient magnitude sqrt(gx^2 + gy^2) (3x3, float64)
    R = mean |image - its JPEG quality-30 re-encoding|                          in [0, 255]

    C = 0.30 H + 0.25 E + 0.20 log1p(L) / 8 + 0.15 G / 16 + 0.10 R / 255

E is not rescaled to [0, 1]: the published formula averages the 0/255 map as it is, so
the edge term usually dominates C. This module reproduces that; it changes nothing in
the formula. Images are scored in parallel on threads (OpenCV releases the GIL).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Sequence

import cv2
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from saec.artifacts.hashing import sha256_file
from saec.artifacts.schemas import source_paths
from saec.artifacts.store import FileRef, write_table
from saec.tasks.edge.config import available_cores
from saec.tasks.edge.preprocess import decode_bgr

# The published run's weights and scales.
W_H, W_E, W_L, W_G, W_R = 0.30, 0.25, 0.20, 0.15, 0.10
L_SCALE, G_SCALE, R_SCALE = 8.0, 16.0, 255.0
COMPONENTS = ("H", "E", "L", "G", "R")
COLUMNS = ["image_id", "path", "source_path", "complexity", *COMPONENTS, "cpx_size"]

_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


class ComplexityConfig(BaseModel):
    """Seed values: a 192 px grey square, Canny thresholds 64/128, JPEG quality 30."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cpx_size: int = Field(192, ge=8, le=4096)
    canny_low: float = Field(64.0, ge=0.0)
    canny_high: float = Field(128.0, ge=0.0)
    jpeg_quality: int = Field(30, ge=1, le=100)
    interpolation: Literal["linear", "area"] = "linear"
    threads: int | None = Field(None, ge=1, description="None: all available cores")
    progress: bool = True


def components(grey: np.ndarray, cfg: ComplexityConfig) -> dict[str, float]:
    """H, E, L, G, R of one grey uint8 image that is already cpx_size x cpx_size."""
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 grey image, got {grey.dtype} {grey.shape}")
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / grey.size
    h = float(-(p * np.log(p)).sum() / math.log(256.0))
    e = float(cv2.Canny(grey, cfg.canny_low, cfg.canny_high).mean())
    lap = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    gx = cv2.Sobel(grey, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_64F, 0, 1, ksize=3)
    g = float(np.sqrt(gx * gx + gy * gy).mean())
    ok, buf = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode an image for the complexity score")
    rec = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    r = float(np.abs(grey.astype(np.int16) - rec.astype(np.int16)).mean())
    return {"H": h, "E": e, "L": lap, "G": g, "R": r}


def combine(h: Any, e: Any, lap: Any, g: Any, r: Any) -> Any:
    """The published run's weighted sum (works on scalars and arrays)."""
    return W_H * h + W_E * e + W_L * np.log1p(lap) / L_SCALE + W_G * g / G_SCALE + W_R * r / R_SCALE


def grey_square(path: str | Path, cfg: ComplexityConfig) -> np.ndarray:
    bgr = decode_bgr(path)  # raises BadImage naming the file when it cannot be read
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    size = (cfg.cpx_size, cfg.cpx_size)
    if grey.shape != size:
        grey = cv2.resize(grey, size, interpolation=_INTERPOLATION[cfg.interpolation])
    return grey


def score_image(path: str | Path, cfg: ComplexityConfig) -> dict[str, float]:
    """Complexity C and its components for one image file."""
    comp = components(grey_square(path, cfg), cfg)
    return {"complexity": float(combine(comp["H"], comp["E"], comp["L"], comp["G"], comp["R"])), **comp}


def _as_manifest(images: pd.DataFrame | Sequence[str | Path]) -> pd.DataFrame:
    if isinstance(images, pd.DataFrame):
        if "path" not in images.columns:
            raise ValueError("the complexity stage needs a manifest with a `path` column")
        df = images[["image_id", "path"]] if "image_id" in images.columns else images[["path"]]
        df = df.reset_index(drop=True).astype({"path": str}).assign(source_path=source_paths(images))
    else:
        df = pd.DataFrame({"path": [str(p) for p in images], "source_path": None})
    if "image_id" not in df.columns:  # ids are the sha256 of the bytes, as everywhere else
        df.insert(0, "image_id", [sha256_file(p) if Path(p).is_file() else None for p in df.path])
    return df


def complexity_scores(images: pd.DataFrame | Sequence[str | Path], cfg: ComplexityConfig | None = None) -> pd.DataFrame:
    """One row per image, in input order: image_id, path, source_path, complexity, H, E, L, G, R, cpx_size.

    `images` is a manifest (columns path and, normally, image_id and source_path, which is null
    where it lacks one) or a list of paths (no source_path). An unreadable image raises `BadImage`
    naming the file; nothing is ever scored 0 silently.
    """
    cfg = cfg or ComplexityConfig()
    df = _as_manifest(images)
    paths = list(df.path)
    threads = cfg.threads or available_cores()
    rows: list[dict[str, float]] = []
    progress = tqdm(total=len(paths), desc="scene complexity", unit="img", leave=False, dynamic_ncols=True,
                    disable=not (cfg.progress and len(paths) > 64))
    with progress, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="complexity") as pool:
        for row in pool.map(score_image, paths, [cfg] * len(paths), chunksize=1):
            rows.append(row)
            progress.update(1)
    scores = pd.DataFrame(rows, columns=["complexity", *COMPONENTS], dtype=np.float64)
    out = pd.concat([df[["image_id", "path", "source_path"]], scores], axis=1)
    out["cpx_size"] = np.int32(cfg.cpx_size)
    return out[COLUMNS]


def write_complexity(
    images: pd.DataFrame | Sequence[str | Path], out_path: str | Path, cfg: ComplexityConfig | None = None
) -> tuple[FileRef, dict[str, Any]]:
    """Score every image and write the `complexity` Parquet table; return its reference and a summary."""
    cfg = cfg or ComplexityConfig()
    t0 = time.perf_counter()
    df = complexity_scores(images, cfg)
    wall = time.perf_counter() - t0
    ref = write_table(df, "complexity", out_path)
    info = {
        "n_images": len(df),
        "cpx_size": cfg.cpx_size,
        "wall_seconds": round(wall, 3),
        "images_per_second": round(len(df) / wall, 2) if wall > 0 else None,
        "complexity": df.complexity.describe().round(4).to_dict() if len(df) else {},
        "mean_terms": {
            "0.30*H": float(W_H * df.H.mean()) if len(df) else None,
            "0.25*E": float(W_E * df.E.mean()) if len(df) else None,
            "0.20*log1p(L)/8": float((W_L * np.log1p(df.L) / L_SCALE).mean()) if len(df) else None,
            "0.15*G/16": float((W_G * df.G / G_SCALE).mean()) if len(df) else None,
            "0.10*R/255": float((W_R * df.R / R_SCALE).mean()) if len(df) else None,
        },
    }
    return ref, info
