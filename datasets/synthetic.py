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

`SyntheticConfig.defect_visibility` (v, 1.0 by default) makes every defect larger and
stronger from the same random draws (see `Visibility`): line widths and the gap of a cut
or break grow by v, lengths and radii by sqrt(v) (so a blob covers about v times the
area), multiplicative darkening or tinting f becomes f**v, opacities a become 1-(1-a)**v,
blend targets move v times farther from the surface they cover, and displacements
(misplaced capsules, bent wires) grow towards their visible limit; the radius of a bend
stays, since a wider bend of the same depth would be gentler. At v = 1 every image
is bit for bit what it was before the knob existed.

Categories (see `CATEGORIES`), each with normal variation in its goods (lighting, small
shifts and rotations, texture phase, colour, sensor noise):

    carpet   RGB texture, twill weave        color, cut, hole, thread
    grid     L texture, woven metal mesh     bent, broken, glue, metal_contamination
    capsule  RGB object with a printed mark  crack, faulty_imprint, misplaced, scratch
    ring     L object, turned-metal washer   chip, contamination, crack, scratch

KolektorSDD2-like surfaces are brushed grey metal (3-channel PNGs, as the real set stores
them) with scratches, spots, cracks and smears; goods may carry faint benign marks.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

Array = np.ndarray
Renderer = Callable[[np.random.Generator, int, "str | None", "Visibility"], tuple[Array, "Array | None"]]

_PNG_COMPRESS = 1  # fixed zlib level: identical pixels give identical bytes
_DIFF_THRESHOLD = 2  # grey levels; a larger change at a pixel puts it in the mask
_KSDD2_FIRST_ID = {"train": 10000, "test": 20000}
_MAX_ATTEMPTS = 12
_VISIBLE_LEVELS = 8  # a defect needs at least min_area / 2 pixels changed by this many grey levels


# --------------------------------------------------------------------------------------
# configuration


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
class Visibility:
    """How much larger and stronger defects are drawn than the reference (v = 1).

    Every transform returns its input unchanged at v = 1, so the reference images stay
    bit for bit the same; none of them draws random numbers, so the random stream (and
    with it every other property of the image) is the same at any v.
    """

    v: float = 1.0

    def __post_init__(self) -> None:
        if not 0.25 <= self.v <= 8.0:
            raise ValueError(f"defect visibility {self.v} must lie within 0.25..8.0")

    @property
    def reference(self) -> bool:
        return self.v == 1.0

    def width(self, px: float) -> int:
        """Stroke width in whole pixels (thin dimension: grows by v), at least 1."""
        return max(int(round(px if self.reference else px * self.v)), 1)

    def thin(self, px: float) -> float:
        """A thin dimension in pixels (the gap of a cut or break): grows by v."""
        return px if self.reference else px * self.v

    def extent(self, px: float) -> float:
        """A length or radius: grows by sqrt(v), so the area of a blob grows about v-fold."""
        return px if self.reference else px * math.sqrt(self.v)

    def factor(self, f: Any) -> Any:
        """A multiplicative change (darkening < 1, brightening or tint > 1) becomes f**v."""
        if self.reference:
            return f
        return np.power(f, self.v).astype(np.float32) if isinstance(f, np.ndarray) else float(f) ** self.v

    def opacity(self, a: Any) -> Any:
        """An opacity in [0, 1] becomes that of v stacked layers: 1 - (1 - a)**v."""
        return a if self.reference else 1.0 - (1.0 - a) ** self.v

    def toward(self, x: float, limit: float) -> float:
        """A displacement bounded by `limit` (same sign): moves towards it, limit - (limit - x) / v."""
        return x if self.reference else limit - (limit - x) / self.v

    def target(self, img: Array, alpha: Array, target: Array | float) -> Array | float:
        """A blend target moved v times farther from the mean of the surface it covers, within 0..255."""
        if self.reference:
            return target
        w = alpha[..., None] if img.ndim == 3 else alpha
        total = float(alpha.sum())
        if total <= 1e-6:
            return target
        mean = (img * w).reshape(-1, img.shape[-1] if img.ndim == 3 else 1).sum(0) / total
        if img.ndim == 2:
            mean = mean[0]
        t = np.asarray(target, np.float32)
        return np.clip(mean + (t - mean) * self.v, 0.0, 255.0).astype(np.float32)


_REFERENCE = Visibility(1.0)


# --------------------------------------------------------------------------------------
# small drawing primitives (all vectorised over the image)


@lru_cache(maxsize=16)
def _coords(h: int, w: int) -> tuple[Array, Array]:
    """Read-only (y, x) pixel-coordinate grids."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> Array:
    """Zero-mean, unit-std noise smooth over about `cell` pixels (bicubic lattice noise)."""
    cell = max(float(cell), 1.0)
    gh, gw = int(math.ceil(h / cell)) + 4, int(math.ceil(w / cell)) + 4
    lattice = rng.standard_normal((gh, gw), dtype=np.float32)
    oy, ox = rng.uniform(1.0, 2.0, 2).tolist()
    # output pixel (x, y) samples the lattice at (x / cell + ox, y / cell + oy)
    m = np.float32([[1.0 / cell, 0.0, ox], [0.0, 1.0 / cell, oy]])
    out = cv2.warpAffine(lattice, m, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT)
    out = out - out.mean()
    return out / max(float(out.std()), 1e-6)


def _grain(rng: np.random.Generator, h: int, w: int, sigma_x: float, sigma_y: float) -> Array:
    """White noise blurred by a (possibly anisotropic) Gaussian, unit std."""
    n = rng.standard_normal((h, w), dtype=np.float32)
    out = cv2.GaussianBlur(n, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y, borderType=cv2.BORDER_REFLECT)
    out *= np.float32(1.0 / _blur_std(round(sigma_x, 2), round(sigma_y, 2)))
    return out


@lru_cache(maxsize=256)
def _blur_std(sigma_x: float, sigma_y: float) -> float:
    """Std of unit white noise after cv2.GaussianBlur with these sigmas (the kernel's L2 norm)."""
    norm = 1.0
    for sigma in (sigma_x, sigma_y):
        size = int(round(sigma * 8 + 1)) | 1  # OpenCV's kernel size for float images
        k = cv2.getGaussianKernel(size, sigma, cv2.CV_64F)
        norm *= float((k**2).sum())
    return math.sqrt(norm)


def _lighting(rng: np.random.Generator, h: int, w: int, amount: float) -> Array:
    """Multiplicative illumination: a tilted plane plus slow variation, around 1."""
    yy, xx = _coords(h, w)
    gx, gy = rng.normal(0.0, amount, 2).tolist()
    plane = gx * (xx / w - 0.5) + gy * (yy / h - 0.5)
    return (1.0 + plane + 0.5 * amount * _smooth_noise(rng, h, w, max(h, w) / 2)).astype(np.float32)


def _polyline_alpha(h: int, w: int, pts: Array, thickness: int) -> Array:
    """Anti-aliased open polyline, as coverage in [0, 1]."""
    canvas = np.zeros((h, w), np.uint8)
    fixed = np.round(np.asarray(pts, np.float64) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [fixed], False, 255, thickness=max(int(thickness), 1), lineType=cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _polygon_alpha(h: int, w: int, pts: Array, soft: float = 0.0) -> Array:
    """Anti-aliased filled polygon, optionally feathered by a Gaussian of `soft` pixels."""
    canvas = np.zeros((h, w), np.uint8)
    fixed = np.round(np.asarray(pts, np.float64) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [fixed], 255, lineType=cv2.LINE_AA, shift=4)
    alpha = canvas.astype(np.float32) / 255.0
    if soft > 0.3:
        alpha = cv2.GaussianBlur(alpha, (0, 0), soft)
    return alpha


def _blob_outline(
    rng: np.random.Generator, cx: float, cy: float, r: float, irregular: float = 0.3,
    aspect: float = 1.0, angle: float = 0.0, n: int = 40,
) -> Array:
    """Vertices of an irregular closed blob of mean radius r (smooth random harmonics)."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    k = np.arange(1, 6)[:, None]
    amp = rng.normal(0.0, irregular, (5, 1)) / k
    phase = rng.uniform(0.0, 2 * np.pi, (5, 1))
    rad = r * np.clip(1.0 + (amp * np.cos(k * t + phase)).sum(0), 0.35, 2.0)
    x, y = rad * np.cos(t) * aspect, rad * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([cx + x * ca - y * sa, cy + x * sa + y * ca], 1)


def _blob(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, r: float, soft: float = 0.8,
          irregular: float = 0.3, aspect: float = 1.0, angle: float | None = None) -> Array:
    ang = float(rng.uniform(0, np.pi)) if angle is None else angle
    return _polygon_alpha(h, w, _blob_outline(rng, cx, cy, r, irregular, aspect, ang), soft)


def _smooth_curve(rng: np.random.Generator, start: Array, angle: float, length: float, wiggle: float,
                  n: int = 16) -> Array:
    """A random-walk curve: heading changes by N(0, wiggle) per segment."""
    headings = angle + np.cumsum(rng.normal(0.0, wiggle, n))
    steps = np.stack([np.cos(headings), np.sin(headings)], 1) * (length / n)
    return np.vstack([start, start + np.cumsum(steps, 0)])


def _jagged_curve(rng: np.random.Generator, start: Array, angle: float, length: float, seg: float = 2.5,
                  wiggle: float = 0.7) -> Array:
    """A zig-zag crack line: segments scattered around one mean heading, slowly drifting."""
    n = max(int(length / seg), 3)
    headings = angle + np.cumsum(rng.normal(0.0, 0.12, n)) + rng.normal(0.0, wiggle, n)
    steps = np.stack([np.cos(headings), np.sin(headings)], 1) * rng.uniform(0.6, 1.4, (n, 1)) * seg
    return np.vstack([start, start + np.cumsum(steps, 0)])


def _crack_alpha(rng: np.random.Generator, h: int, w: int, start: Array, angle: float, length: float,
                 thickness: int, seg: float, branch_width: int = 1) -> Array:
    """A crack with an optional side branch, as coverage."""
    main = _jagged_curve(rng, start, angle, length, seg)
    alpha = _polyline_alpha(h, w, main, thickness)
    if rng.random() < 0.5:
        at = main[int(rng.integers(1, len(main) - 1))]
        side = angle + float(rng.choice([-1, 1])) * rng.uniform(0.5, 1.1)
        branch = _jagged_curve(rng, at, side, length * rng.uniform(0.25, 0.5), seg)
        alpha = np.maximum(alpha, _polyline_alpha(h, w, branch, branch_width))
    return alpha


def _mix(img: Array, alpha: Array, target: Array | float) -> Array:
    """Blend `target` over `img` with per-pixel coverage `alpha` (grey or RGB)."""
    a = alpha[..., None] if img.ndim == 3 else alpha
    return img * (1.0 - a) + np.asarray(target, np.float32) * a


def _scale(img: Array, alpha: Array, factor: Array | float) -> Array:
    """Multiply `img` by `factor` where alpha is 1, smoothly less elsewhere."""
    a = alpha[..., None] if img.ndim == 3 else alpha
    return img * (1.0 + (np.asarray(factor, np.float32) - 1.0) * a)


def _erode(alpha: Array, px: int) -> Array:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.erode(alpha, k)


def _shadow(alpha: Array, dx: float, dy: float, blur: float) -> Array:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(alpha, m, (alpha.shape[1], alpha.shape[0]), flags=cv2.INTER_LINEAR, borderValue=0)
    return cv2.GaussianBlur(moved, (0, 0), blur)


def _scratch(rng: np.random.Generator, img: Array, alpha: Array, at: Array, vis: Visibility = _REFERENCE) -> Array:
    """A scratch catches the light on a dark surface and reads dark on a bright one."""
    y, x = int(np.clip(at[1], 0, img.shape[0] - 1)), int(np.clip(at[0], 0, img.shape[1] - 1))
    local = float(np.mean(img[max(y - 3, 0) : y + 4, max(x - 3, 0) : x + 4]))
    if local < 150.0 or (local < 190.0 and rng.random() < 0.5):
        return _mix(img, alpha, vis.target(img, alpha, min(local + rng.uniform(60.0, 110.0), 255.0)))
    return _scale(img, alpha, vis.factor(rng.uniform(0.4, 0.7)))


def _line_width(rng: np.random.Generator, sc: float, vis: Visibility = _REFERENCE) -> int:
    """Width in pixels of a scratch or crack on a part: mostly 2 at 256 px, sometimes 1 or 3 (times v)."""
    return vis.width(_pick(rng, [1, 2, 3], [0.2, 0.5, 0.3]) * sc)


def _pick(rng: np.random.Generator, options: list[Any], p: list[float] | None = None) -> Any:
    return options[int(rng.choice(len(options), p=p))]


# --------------------------------------------------------------------------------------
# carpet: RGB twill-woven texture


def _render_carpet(rng: np.random.Generator, s: int, defect: str | None,
                   vis: Visibility = _REFERENCE) -> tuple[Array, Array | None]:
    sc = s / 256.0
    yy, xx = _coords(s, s)
    period = rng.uniform(6.0, 7.2) * sc
    th = math.radians(rng.normal(0.0, 1.5))
    u = (xx * math.cos(th) + yy * math.sin(th)) / period + rng.uniform(0, 8)
    v = (-xx * math.sin(th) + yy * math.cos(th)) / period + rng.uniform(0, 8)
    u = u + 0.18 * _smooth_noise(rng, s, s, 40 * sc)
    v = v + 0.18 * _smooth_noise(rng, s, s, 40 * sc)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    iu_i, iv_i = iu.astype(np.int64), iv.astype(np.int64)
    over = ((iu_i - iv_i) % 4) < 2  # 2/2 twill: diagonal ribs
    pu, pv = np.sin(np.pi * fu) ** 0.7, np.sin(np.pi * fv) ** 0.7
    height = np.where(over, pu * (0.55 + 0.45 * pv), pv * (0.55 + 0.45 * pu))
    yarn_tab = rng.normal(0.0, 1.0, (2, 64)).astype(np.float32)
    yarn = np.where(over, yarn_tab[0][iu_i % 64], yarn_tab[1][iv_i % 64])
    fibre = _grain(rng, s, s, 0.7, 0.7)
    lum = (0.42 + 0.62 * height) * (1.0 + 0.07 * yarn) * (1.0 + 0.06 * fibre)
    base = (np.array([146.0, 118.0, 96.0]) * rng.uniform(0.9, 1.1) + rng.normal(0.0, 5.0, 3)).astype(np.float32)
    # a few fibres of another colour, as in mixed-yarn carpet
    fleck = np.clip(_grain(rng, s, s, 0.9, 0.9) - 2.2, 0.0, 1.0)[..., None]
    fleck_col = np.array([0.75, 0.85, 1.15], np.float32)
    img = lum[..., None] * base * (1.0 + (fleck_col - 1.0) * fleck)
    img = img * _lighting(rng, s, s, 0.10)[..., None]
    if defect is None:
        return img, None
    out = img.copy()
    cx, cy = (rng.uniform(0.12, 0.88, 2) * s).tolist()
    if defect == "color":
        r = vis.extent(rng.uniform(7.0, 34.0) * sc)
        a = _blob(rng, s, s, cx, cy, r, soft=r * 0.25, irregular=0.35, aspect=rng.uniform(0.6, 1.6))
        tint = _pick(rng, [(1.35, 0.72, 0.65), (0.72, 0.82, 1.3), (0.55, 0.5, 0.45), (1.2, 1.15, 0.6), (0.8, 1.2, 0.8)])
        strength = rng.uniform(0.45, 1.0)
        out = _scale(out, a * strength, vis.factor(np.array(tint, np.float32)))
    elif defect == "hole":
        r = vis.extent(rng.uniform(4.5, 16.0) * sc)
        core = _blob(rng, s, s, cx, cy, r, soft=0.7, irregular=0.35)
        ring = np.clip(_blob(rng, s, s, cx, cy, r * 1.45, soft=1.0, irregular=0.35) - core, 0.0, 1.0)  # frayed fibres
        dark = rng.uniform(18.0, 50.0) * (1.0 + 0.2 * _grain(rng, s, s, 1.0, 1.0))
        out = _scale(out, ring * (0.5 + 0.5 * np.clip(_grain(rng, s, s, 0.6, 0.6), 0, 2)), vis.factor(1.25))
        out = _mix(out, core, vis.target(out, core, dark[..., None] * np.array([1.0, 0.9, 0.85], np.float32)))
    elif defect == "cut":
        length = vis.extent(rng.uniform(20.0, 75.0) * sc)
        path = _smooth_curve(rng, np.array([cx, cy]), rng.uniform(0, 2 * np.pi), length, 0.06, n=10)
        t = vis.width(int(rng.integers(2, 4)))
        edge = _polyline_alpha(s, s, path, t + 2)
        gap = _polyline_alpha(s, s, path, t)
        out = _scale(out, edge, vis.factor(rng.uniform(1.1, 1.25)))
        out = _scale(out, gap, vis.factor(rng.uniform(0.2, 0.55)))
    elif defect == "thread":
        length = vis.extent(rng.uniform(40.0, 130.0) * sc)
        path = _smooth_curve(rng, np.array([cx, cy]), rng.uniform(0, 2 * np.pi), length, 0.3, n=18)
        colour = _pick(rng, [(215, 205, 185), (55, 45, 38), (170, 50, 45), (60, 80, 150), (120, 100, 80)])
        t = vis.width(int(rng.integers(2, 4)))
        shadow = _polyline_alpha(s, s, path + rng.uniform(1.0, 2.0, 2) * sc, t + 1)
        thread = _polyline_alpha(s, s, path, t)
        out = _scale(out, shadow, vis.factor(0.7))
        a = thread * vis.opacity(rng.uniform(0.7, 1.0))
        out = _mix(out, a, vis.target(out, a, np.array(colour, np.float32) * rng.uniform(0.9, 1.1)))
    else:
        raise ValueError(f"carpet has no defect type {defect!r}")
    return img, out


# --------------------------------------------------------------------------------------
# grid: greyscale woven metal mesh


def _render_grid(rng: np.random.Generator, s: int, defect: str | None,
                 vis: Visibility = _REFERENCE) -> tuple[Array, Array | None]:
    sc = s / 256.0
    yy, xx = _coords(s, s)
    period = rng.uniform(14.0, 17.0) * sc
    wire = rng.uniform(1.6, 2.2) * sc
    th = math.radians(rng.normal(0.0, 2.0))
    ct, st = math.cos(th), math.sin(th)
    u0 = (xx * ct + yy * st) / period + rng.uniform(0, 4) + 0.04 * _smooth_noise(rng, s, s, 60 * sc)
    v0 = (-xx * st + yy * ct) / period + rng.uniform(0, 4) + 0.04 * _smooth_noise(rng, s, s, 60 * sc)
    bg_level = rng.uniform(30.0, 55.0)
    hi_level = rng.uniform(160.0, 200.0)
    background = bg_level * (1.0 + 0.18 * _smooth_noise(rng, s, s, 8 * sc) + 0.08 * _grain(rng, s, s, 1.0, 1.0))
    gain = _lighting(rng, s, s, 0.14)
    wire_tex = 1.0 + 0.06 * _grain(rng, s, s, 0.8, 0.8)
    side = float(rng.choice([-1.0, 1.0]))

    def draw(du: Array | float = 0.0, dv: Array | float = 0.0, cut_u: Array | float = 0.0,
             cut_v: Array | float = 0.0) -> Array:
        u, v = u0 + du, v0 + dv
        fu, fv = (u - np.round(u)) * period, (v - np.round(v)) * period
        wu = np.exp(-((fu / wire) ** 2)) * (0.78 + 0.22 * np.cos(2 * np.pi * v)) * (1 + 0.2 * side * np.tanh(fu / wire))
        wv = np.exp(-((fv / wire) ** 2)) * (0.78 - 0.22 * np.cos(2 * np.pi * u)) * (1 + 0.2 * side * np.tanh(fv / wire))
        wu, wv = wu * (1.0 - cut_u), wv * (1.0 - cut_v)
        m = np.clip(np.maximum(wu, wv), 0.0, 1.25)
        return (background + (hi_level - bg_level) * m * wire_tex) * gain

    clean = draw()
    if defect is None:
        return clean, None
    cx, cy = (rng.uniform(0.12, 0.88, 2) * s).tolist()
    if defect == "bent":
        # A bend shows as curvature, depth over radius: a deeper bend is more visible, a wider one
        # less, so visibility deepens it and leaves its radius alone.
        sigma = rng.uniform(7.0, 16.0) * sc
        amp = vis.toward(rng.uniform(0.25, 0.55), 0.6) * float(rng.choice([-1.0, 1.0]))  # in periods
        bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)) * amp
        out = draw(du=bump) if rng.random() < 0.5 else draw(dv=bump)
    elif defect == "broken":
        cut_u = np.zeros((s, s), np.float32)
        cut_v = np.zeros((s, s), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            px = float(np.clip(cx + rng.normal(0, 6 * sc), 0, s - 1))
            py = float(np.clip(cy + rng.normal(0, 6 * sc), 0, s - 1))
            along_u = rng.random() < 0.5  # break a wire of constant u (it runs along the v axis)
            iy, ix = int(py), int(px)
            if along_u:
                shift = float(np.round(u0[iy, ix]) - u0[iy, ix]) * period
                px, py, angle = px + shift * ct, py + shift * st, th + np.pi / 2
            else:
                shift = float(np.round(v0[iy, ix]) - v0[iy, ix]) * period
                px, py, angle = px - shift * st, py + shift * ct, th
            across = wire * 2.2
            length = vis.thin(rng.uniform(4.0, 10.0) * sc)
            a = _polygon_alpha(s, s, _blob_outline(rng, px, py, across, 0.1, aspect=length / across, angle=angle), 0.5)
            if along_u:
                cut_u = np.maximum(cut_u, a)
            else:
                cut_v = np.maximum(cut_v, a)
        out = draw(cut_u=cut_u, cut_v=cut_v)
    elif defect == "glue":
        r = vis.extent(rng.uniform(9.0, 30.0) * sc)
        a = _blob(rng, s, s, cx, cy, r, soft=r * 0.2, irregular=0.4, aspect=rng.uniform(0.6, 1.7))
        tone = rng.uniform(95.0, 190.0) * (1.0 + 0.08 * _smooth_noise(rng, s, s, 6 * sc))
        sheen = 1.0 + 0.25 * np.exp(-(((xx - cx + r * 0.3) ** 2 + (yy - cy + r * 0.3) ** 2) / (2 * (0.35 * r) ** 2)))
        a = a * vis.opacity(rng.uniform(0.55, 0.9))
        out = _mix(clean, a, vis.target(clean, a, tone * sheen * gain))
    elif defect == "metal_contamination":
        r = vis.extent(rng.uniform(3.0, 9.0) * sc)
        outline = _blob_outline(rng, cx, cy, r, 0.5, rng.uniform(0.5, 2.0), rng.uniform(0, np.pi), n=9)
        a = _polygon_alpha(s, s, outline, 0.4)
        shade = rng.uniform(175.0, 250.0) * (1.0 + 0.25 * ((xx - cx) - (yy - cy)) / max(r, 1.0) * 0.5)
        out = _scale(clean, _shadow(a, 1.5 * sc, 1.5 * sc, 0.8 * sc), vis.factor(0.55))
        out = _mix(out, a, vis.target(out, a, np.clip(shade, 120.0, 255.0)))
    else:
        raise ValueError(f"grid has no defect type {defect!r}")
    return clean, out


# --------------------------------------------------------------------------------------
# capsule: RGB two-colour capsule with a printed mark, centred on a plain background


@lru_cache(maxsize=64)
def _text_metrics(text: str, font: int, scale: float, thick: int) -> tuple[tuple[int, int], tuple[int, ...]]:
    """Size of the whole string and the advance of each character."""
    size, _ = cv2.getTextSize(text, font, scale, thick)
    return size, tuple(cv2.getTextSize(ch, font, scale, thick)[0][0] for ch in text)


@dataclass(frozen=True)
class _CapsulePose:
    dx: float
    dy: float
    angle: float  # degrees


def _render_capsule(rng: np.random.Generator, s: int, defect: str | None,
                    vis: Visibility = _REFERENCE) -> tuple[Array, Array | None]:
    sc = s / 256.0
    yy, xx = _coords(s, s)
    length = rng.uniform(0.66, 0.70) * s
    radius = rng.uniform(0.125, 0.135) * s
    seam = rng.uniform(-0.02, 0.02) * s - 0.06 * s
    col_cap = (np.array([196.0, 72.0, 34.0]) * rng.uniform(0.93, 1.07) + rng.normal(0, 4, 3)).astype(np.float32)
    col_body = (np.array([232.0, 220.0, 196.0]) * rng.uniform(0.95, 1.04) + rng.normal(0, 3, 3)).astype(np.float32)
    ink_col = (np.array([30.0, 28.0, 30.0]) + rng.normal(0, 4, 3)).astype(np.float32)
    ink_strength = rng.uniform(0.8, 0.95)
    light = np.array([rng.normal(-0.3, 0.08), rng.normal(-0.45, 0.08), 0.85])
    light = (light / np.linalg.norm(light)).astype(np.float32)
    text = "500"
    font, font_scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.78 * sc, max(int(round(2 * sc)), 1)
    text_x = s / 2 + 0.20 * length + rng.normal(0, 0.6 * sc)
    text_y = s / 2 + rng.normal(0, 0.5 * sc)
    bg_col = (np.array([205.0, 207.0, 210.0]) * rng.uniform(0.92, 1.05) + rng.normal(0, 2, 3)).astype(np.float32)
    background = bg_col * (1.0 + 0.02 * _smooth_noise(rng, s, s, 50 * sc))[..., None]
    vignette = 1.0 - 0.10 * (((xx - s / 2) ** 2 + (yy - s / 2) ** 2) / (0.5 * s) ** 2)
    background = background * vignette[..., None] * _lighting(rng, s, s, 0.05)[..., None]
    surface = 1.0 + 0.015 * _grain(rng, s, s, 1.2, 1.2)

    # the capsule in its own frame, centred in an s x s canvas
    x, y = xx - s / 2, yy - s / 2
    dxs = np.maximum(np.abs(x) - (length / 2 - radius), 0.0)
    d = np.hypot(dxs, y)
    alpha_obj = np.clip(radius - d + 0.5, 0.0, 1.0)
    nz = np.sqrt(np.clip(1.0 - (d / radius) ** 2, 0.0, 1.0))
    nx, ny = np.sign(x) * dxs / radius, y / radius
    lam = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0.0, 1.0)
    half = (x < seam)[..., None]
    colour = np.where(half, col_cap, col_body)
    groove = 1.0 - 0.35 * np.exp(-(((x - seam) / (1.2 * sc)) ** 2))
    spec = 70.0 * np.exp(-(((ny + 0.42) / 0.14) ** 2)) * nz
    shaded = colour * (0.38 + 0.62 * lam)[..., None] * (groove * surface)[..., None] + spec[..., None]

    def ink_layer(keep: tuple[bool, ...]) -> Array:
        canvas = np.zeros((s, s), np.uint8)
        (tw, th_), widths = _text_metrics(text, font, font_scale, thick)
        ox, oy = text_x - tw / 2, text_y + th_ / 2
        for ch, cw, k in zip(text, widths, keep):
            if k:
                cv2.putText(canvas, ch, (int(round(ox)), int(round(oy))), font, font_scale, 255, thick, cv2.LINE_AA)
            ox += cw
        return canvas.astype(np.float32) / 255.0 * nz**0.6 * ink_strength

    def compose(pose: _CapsulePose, ink: Array) -> Array:
        obj = _mix(shaded, ink, ink_col)
        m = cv2.getRotationMatrix2D((s / 2, s / 2), pose.angle, 1.0)
        m[:, 2] += (pose.dx, pose.dy)
        warped = cv2.warpAffine(obj.astype(np.float32), m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
        a = cv2.warpAffine(alpha_obj, m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
        shade = _shadow(a, 3.0 * sc, 4.0 * sc, 4.0 * sc)
        return _mix(_scale(background, shade, 0.72), a, warped)

    pose = _CapsulePose(rng.normal(0, 1.5) * sc, rng.normal(0, 1.5) * sc, rng.normal(0, 1.0))
    full_ink = ink_layer((True, True, True))
    clean = compose(pose, full_ink)
    if defect is None:
        return clean, None

    m = cv2.getRotationMatrix2D((s / 2, s / 2), pose.angle, 1.0)
    m[:, 2] += (pose.dx, pose.dy)
    a_img = cv2.warpAffine(alpha_obj, m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
    inside = _erode(a_img, max(int(3 * sc), 1))

    def on_capsule(margin: float) -> Array:
        ox = rng.uniform(-(length / 2 - radius), length / 2 - radius)
        oy = rng.uniform(-margin, margin) * radius
        return m @ np.array([ox + s / 2, oy + s / 2, 1.0])

    if defect == "misplaced":
        kind = _pick(rng, ["shift", "rotate", "both", "flip"], [0.3, 0.3, 0.25, 0.15])
        ang = pose.angle
        dx, dy = pose.dx, pose.dy
        if kind in ("shift", "both"):
            mag, direc = vis.toward(rng.uniform(10.0, 30.0), 45.0) * sc, rng.uniform(0, 2 * np.pi)
            dx, dy = dx + mag * np.cos(direc), dy + mag * np.sin(direc) * 0.6
        if kind in ("rotate", "both"):
            ang = ang + float(rng.choice([-1, 1])) * vis.toward(rng.uniform(6.0, 22.0), 45.0)
        if kind == "flip":
            ang = ang + 180.0 + rng.normal(0, 1.0)
        out = compose(_CapsulePose(dx, dy, ang), full_ink)
    elif defect == "faulty_imprint":
        kind = _pick(rng, ["missing_char", "missing_all", "faded"], [0.45, 0.2, 0.35])
        if kind == "missing_char":
            keep = [True, True, True]
            keep[int(rng.integers(0, 3))] = False
            ink = ink_layer(tuple(keep))
        elif kind == "missing_all":
            ink = np.zeros_like(full_ink)
        else:
            r = vis.extent(rng.uniform(7.0, 14.0) * sc)
            eraser = _blob(rng, s, s, text_x + rng.normal(0, 6 * sc), text_y + rng.normal(0, 3 * sc), r, soft=r * 0.3)
            ink = full_ink * (1.0 - eraser * vis.opacity(rng.uniform(0.7, 1.0)))
        out = compose(pose, ink)
    elif defect == "crack":
        start = on_capsule(0.6)
        a = _crack_alpha(rng, s, s, start, rng.uniform(0, 2 * np.pi), vis.extent(rng.uniform(14.0, 45.0) * sc),
                         _line_width(rng, sc, vis), vis.extent(2.5 * sc), vis.width(1)) * inside
        out = _scale(clean, a, vis.factor(rng.uniform(0.25, 0.6)))
    elif defect == "scratch":
        start = on_capsule(0.5)
        path = _smooth_curve(rng, start, rng.uniform(0, 2 * np.pi), vis.extent(rng.uniform(18.0, 70.0) * sc), 0.1,
                             n=10)
        a = _polyline_alpha(s, s, path, _line_width(rng, sc, vis)) * inside * vis.opacity(rng.uniform(0.7, 1.0))
        out = _scratch(rng, clean, a, start, vis)
    else:
        raise ValueError(f"capsule has no defect type {defect!r}")
    return clean, out


# --------------------------------------------------------------------------------------
# ring: greyscale turned-metal washer on a dark background


def _render_ring(rng: np.random.Generator, s: int, defect: str | None,
                 vis: Visibility = _REFERENCE) -> tuple[Array, Array | None]:
    sc = s / 256.0
    yy, xx = _coords(s, s)
    cx, cy = s / 2 + rng.normal(0, 2.0) * sc, s / 2 + rng.normal(0, 2.0) * sc
    r_out = rng.uniform(0.385, 0.405) * s
    r_in = rng.uniform(0.185, 0.2) * s
    phi = rng.uniform(0, 2 * np.pi)
    base = rng.uniform(140.0, 175.0)
    aniso_amp = rng.uniform(0.15, 0.3)
    r = np.hypot(xx - cx, yy - cy)
    theta = np.arctan2(yy - cy, xx - cx)
    radial = np.arange(0, s, dtype=np.float32)
    profile = cv2.GaussianBlur(rng.standard_normal((1, s)).astype(np.float32), (0, 0), 0.8).ravel()
    profile = profile / max(float(profile.std()), 1e-6) + 0.6 * np.sin(2 * np.pi * radial / rng.uniform(2.2, 3.2))
    grooves = np.interp(r, radial, profile).astype(np.float32)
    streak = _grain(rng, s, s, 1.2, 1.2)
    sheen = 1.0 - aniso_amp + aniso_amp * (0.5 + 0.5 * np.cos(2 * (theta - phi))) * 2  # turned metal's two lobes
    surf = base * (1.0 + 0.05 * grooves + 0.03 * streak) * sheen
    lit = np.cos(theta - phi)
    bevels = 55.0 * np.exp(-(((r_out - r) / (1.8 * sc)) ** 2)) - 45.0 * np.exp(-(((r - r_in) / (1.8 * sc)) ** 2))
    surf = surf + bevels * lit
    bg = rng.uniform(35.0, 60.0) * (1.0 + 0.12 * _smooth_noise(rng, s, s, 30 * sc) + 0.05 * _grain(rng, s, s, 1.0, 1.0))
    gain = _lighting(rng, s, s, 0.08)
    ring_alpha = np.clip(r_out - r + 0.5, 0.0, 1.0) * np.clip(r - r_in + 0.5, 0.0, 1.0)

    def compose(bite: Array | None = None) -> Array:
        a = ring_alpha if bite is None else ring_alpha * (1.0 - bite)
        top = surf
        if bite is not None:  # the freshly broken edge catches the light
            top = surf + 60.0 * np.clip(cv2.GaussianBlur(bite, (0, 0), 1.2 * sc) - bite, 0.0, 1.0) * 2.0
        shade = _shadow(a, -3.0 * sc * np.cos(phi), -3.0 * sc * np.sin(phi), 3.0 * sc)
        return _mix(_scale(bg, shade, 0.55), a, top) * gain

    clean = compose()
    if defect is None:
        return clean, None
    inside = _erode(ring_alpha, max(int(3 * sc), 1))

    def on_ring() -> Array:
        rr = rng.uniform(r_in + 5 * sc, r_out - 5 * sc)
        t = rng.uniform(0, 2 * np.pi)
        return np.array([cx + rr * np.cos(t), cy + rr * np.sin(t)])

    if defect == "scratch":
        start = on_ring()
        path = _smooth_curve(rng, start, rng.uniform(0, 2 * np.pi), vis.extent(rng.uniform(16.0, 60.0) * sc), 0.08,
                             n=10)
        a = _polyline_alpha(s, s, path, _line_width(rng, sc, vis)) * inside * vis.opacity(rng.uniform(0.7, 1.0))
        out = _scratch(rng, clean, a, start, vis)
    elif defect == "crack":
        t = rng.uniform(0, 2 * np.pi)
        from_outer = rng.random() < 0.5
        rr = r_out - 1.0 if from_outer else r_in + 1.0
        start = np.array([cx + rr * np.cos(t), cy + rr * np.sin(t)])
        heading = t + (np.pi if from_outer else 0.0) + rng.normal(0, 0.3)
        a = _crack_alpha(rng, s, s, start, heading, vis.extent(rng.uniform(12.0, 40.0) * sc), _line_width(rng, sc, vis),
                         vis.extent(2.5 * sc), vis.width(1))
        out = _scale(clean, a * ring_alpha, vis.factor(rng.uniform(0.2, 0.5)))
    elif defect == "contamination":
        centre = on_ring()
        if rng.random() < 0.5:  # oily stain
            rb = vis.extent(rng.uniform(6.0, 16.0) * sc)
            a = _blob(rng, s, s, centre[0], centre[1], rb, soft=rb * 0.3, irregular=0.4, aspect=rng.uniform(0.6, 1.6))
            out = _scale(clean, a * ring_alpha, vis.factor(rng.uniform(0.4, 0.7)))
        else:  # particle or fibre lying on the part
            if rng.random() < 0.5:
                rb = vis.extent(rng.uniform(3.0, 7.0) * sc)
                a = _polygon_alpha(s, s, _blob_outline(rng, centre[0], centre[1], rb, 0.5, n=8), 0.4)
            else:
                heading = rng.uniform(0, 2 * np.pi)
                path = _smooth_curve(rng, centre, heading, vis.extent(rng.uniform(16, 45) * sc), 0.35, n=12)
                a = _polyline_alpha(s, s, path, vis.width(int(rng.integers(1, 3))))
            out = _scale(clean, _shadow(a, 1.2 * sc, 1.2 * sc, 0.8 * sc), vis.factor(0.6))
            tone = rng.uniform(10.0, 40.0) if rng.random() < 0.6 else rng.uniform(225.0, 255.0)
            out = _mix(out, a, vis.target(out, a, tone))
    elif defect == "chip":
        rb = vis.extent(rng.uniform(6.0, 16.0) * sc)
        t = rng.uniform(0, 2 * np.pi)
        outer = rng.random() < 0.75
        dist = r_out + rb * rng.uniform(-0.1, 0.5) if outer else r_in - rb * rng.uniform(-0.1, 0.5)
        bite = _blob(rng, s, s, cx + dist * np.cos(t), cy + dist * np.sin(t), rb, soft=0.5, irregular=0.3)
        out = compose(bite)
    else:
        raise ValueError(f"ring has no defect type {defect!r}")
    return clean, out


# --------------------------------------------------------------------------------------
# the pretraining world: categories and defect kinds the embedded evaluation never shows.
# Stand-in models learn "a part and what is wrong with it" here, then meet carpet, grid,
# capsule and ring only when they are evaluated or fine-tuned.


def _render_tile(rng: np.random.Generator, s: int, defect: str | None,
                 vis: Visibility = _REFERENCE) -> tuple[Array, Array | None]:
    """Greyscale glazed floor tiles in a square grout grid."""
    sc = s / 256.0
    yy, xx = _coords(s, s)
    pitch = rng.uniform(48.0, 72.0) * sc
    ox, oy = rng.uniform(0, pitch, 2).tolist()
    grout_w = rng.uniform(2.5, 4.0) * sc
    fx, fy = np.mod(xx + ox, pitch), np.mod(yy + oy, pitch)
    edge = np.minimum(np.minimum(fx, pitch - fx), np.minimum(fy, pitch - fy))
    grout = np.clip(grout_w - edge + 0.5, 0.0, 1.0)
    idx = (np.floor((xx + ox) / pitch) * 7 + np.floor((yy + oy) / pitch)).astype(np.int64)
    shade = rng.normal(0.0, 1.0, 97).astype(np.float32)[idx % 97]
    glaze = rng.uniform(150.0, 200.0) * (1.0 + 0.03 * shade + 0.02 * _smooth_noise(rng, s, s, 20 * sc))
    glaze = glaze + 6.0 * _grain(rng, s, s, 0.8, 0.8)
    bevel = 25.0 * np.exp(-(((edge - grout_w) / (1.5 * sc)) ** 2))
    img = _mix(glaze + bevel, grout, rng.uniform(70.0, 100.0) + 8.0 * _grain(rng, s, s, 1.0, 1.0))
    img = img * _lighting(rng, s, s, 0.08)
    if defect is None:
        return img, None
    face = np.clip(edge - grout_w - 2.0 * sc, 0.0, 1.0)
    cx, cy = (rng.uniform(0.15, 0.85, 2) * s).tolist()
    if defect == "stain":
        r = vis.extent(rng.uniform(8.0, 26.0) * sc)
        a = _blob(rng, s, s, cx, cy, r, soft=r * 0.4, irregular=0.5, aspect=rng.uniform(0.6, 1.6))
        out = _scale(img, a * face, vis.factor(rng.uniform(0.5, 0.75)))
    elif defect == "spall":  # a flake of glaze gone at a tile corner or edge, rough and darker
        r = vis.extent(rng.uniform(5.0, 13.0) * sc)
        corner_x = np.round((cx + ox) / pitch) * pitch - ox
        corner_y = np.round((cy + oy) / pitch) * pitch - oy
        a = _blob(rng, s, s, corner_x + rng.normal(0, 2) * sc, corner_y + rng.normal(0, 2) * sc, r, soft=0.6,
                  irregular=0.5)
        rough = 1.0 + 0.25 * np.clip(_grain(rng, s, s, 0.7, 0.7), -2, 2)
        out = _mix(img, a, vis.target(img, a, rng.uniform(60.0, 95.0) * rough))
    elif defect == "hairline":  # a fine straight-ish fracture across one tile face
        length = vis.extent(rng.uniform(20.0, 55.0) * sc)
        path = _smooth_curve(rng, np.array([cx, cy]), rng.uniform(0, 2 * np.pi), length, 0.05, n=12)
        a = _polyline_alpha(s, s, path, vis.width(1)) * face * vis.opacity(rng.uniform(0.75, 1.0))
        out = _scale(img, a, vis.factor(rng.uniform(0.35, 0.6)))
    else:
        raise ValueError(f"tile has no defect type {defect!r}")
    return img, out


def _render_leather(rng: np.random.Generator, s: int, defect: str | None,
                    vis: Visibility = _REFERENCE) -> tuple[Array, Array | None]:
    """RGB pebble-grain leather."""
    sc = s / 256.0
    cells = cv2.GaussianBlur(rng.standard_normal((s, s)).astype(np.float32), (0, 0), 2.2 * sc + 0.3)
    cells = cells / max(float(cells.std()), 1e-6)
    pebble = np.tanh(1.6 * cells)
    fine = _grain(rng, s, s, 0.6, 0.6)
    lum = 0.78 + 0.10 * pebble + 0.04 * fine + 0.05 * _smooth_noise(rng, s, s, 60 * sc)
    base = np.array(_pick(rng, [(120.0, 78.0, 50.0), (60.0, 45.0, 40.0), (150.0, 120.0, 90.0), (95.0, 30.0, 28.0)]),
                    np.float32) * rng.uniform(0.9, 1.1)
    img = lum[..., None] * base * _lighting(rng, s, s, 0.08)[..., None]
    if defect is None:
        return img, None
    cx, cy = (rng.uniform(0.15, 0.85, 2) * s).tolist()
    if defect == "fold":  # a crease: a bright ridge beside a dark valley
        length = vis.extent(rng.uniform(35.0, 100.0) * sc)
        angle = rng.uniform(0, 2 * np.pi)
        path = _smooth_curve(rng, np.array([cx, cy]), angle, length, 0.1, n=12)
        t = vis.width(int(rng.integers(2, 4)) * sc)
        offset = np.array([-np.sin(angle), np.cos(angle)]) * max(t, 1) * 1.2
        valley = _polyline_alpha(s, s, path, t)
        ridge = _polyline_alpha(s, s, path + offset, t)
        out = _scale(img, ridge * (1.0 - valley), vis.factor(1.35))
        out = _scale(out, valley, vis.factor(rng.uniform(0.45, 0.65)))
    elif defect == "poke":  # a small puncture with a raised rim
        r = vis.extent(rng.uniform(2.5, 6.0) * sc)
        core = _blob(rng, s, s, cx, cy, r, soft=0.5, irregular=0.25)
        rim = np.clip(_blob(rng, s, s, cx, cy, r * 1.8, soft=0.8, irregular=0.25) - core, 0.0, 1.0)
        out = _scale(img, rim, vis.factor(1.3))
        out = _mix(out, core, vis.target(out, core, rng.uniform(10.0, 30.0)))
    elif defect == "scuff":  # a worn, lighter patch where the grain is rubbed flat
        r = vis.extent(rng.uniform(10.0, 28.0) * sc)
        a = _blob(rng, s, s, cx, cy, r, soft=r * 0.35, irregular=0.45, aspect=rng.uniform(1.2, 2.4))
        flat = (0.85 + 0.04 * fine)[..., None] * base * 1.25
        out = _mix(img, a * vis.opacity(rng.uniform(0.6, 0.95)), vis.target(img, a, flat))
    else:
        raise ValueError(f"leather has no defect type {defect!r}")
    return img, out


def _render_pill(rng: np.random.Generator, s: int, defect: str | None,
                 vis: Visibility = _REFERENCE) -> tuple[Array, Array | None]:
    """An RGB round or oval tablet, lit from one side, on a dark tray."""
    sc = s / 256.0
    yy, xx = _coords(s, s)
    cx, cy = s / 2 + rng.normal(0, 3.0) * sc, s / 2 + rng.normal(0, 3.0) * sc
    rx = rng.uniform(0.30, 0.38) * s
    ry = rx * (rng.uniform(0.55, 0.75) if rng.random() < 0.5 else 1.0)
    angle = rng.uniform(0, np.pi)
    ca, sa = math.cos(angle), math.sin(angle)
    u = ((xx - cx) * ca + (yy - cy) * sa) / rx
    v = (-(xx - cx) * sa + (yy - cy) * ca) / ry
    rho = np.sqrt(u * u + v * v)
    body = np.clip((1.0 - rho) * min(rx, ry) + 0.5, 0.0, 1.0)
    light = rng.uniform(0, 2 * np.pi)
    dome = np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0))
    shading = 0.75 + 0.25 * dome + 0.12 * (u * math.cos(light) + v * math.sin(light)) * dome
    colour = np.array(_pick(rng, [(235.0, 232.0, 225.0), (230.0, 200.0, 120.0), (200.0, 90.0, 80.0),
                                  (150.0, 180.0, 220.0)]), np.float32)
    surf = (shading * (1.0 + 0.015 * _grain(rng, s, s, 0.8, 0.8)))[..., None] * colour
    tray = (rng.uniform(30.0, 55.0) * (1.0 + 0.1 * _smooth_noise(rng, s, s, 40 * sc)))[..., None] * np.ones(3, np.float32)
    shade = _shadow(body, 4.0 * sc * math.cos(light + np.pi), 4.0 * sc * math.sin(light + np.pi), 4.0 * sc)
    gain = _lighting(rng, s, s, 0.06)[..., None]

    def compose(bite: Array | None = None) -> Array:
        a = body if bite is None else body * (1.0 - bite)
        return _mix(_scale(tray, shade, 0.5), a, surf) * gain

    clean = compose()
    if defect is None:
        return clean, None
    inside = _erode(body, max(int(4 * sc), 1))
    t, rr = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0.0, 0.6))
    px = cx + rr * (rx * math.cos(t) * ca - ry * math.sin(t) * sa)
    py = cy + rr * (rx * math.cos(t) * sa + ry * math.sin(t) * ca)
    if defect == "speck":  # dark or coloured particles pressed into the tablet
        a = np.zeros((s, s), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            r = vis.extent(rng.uniform(1.5, 4.0) * sc)
            a = np.maximum(a, _blob(rng, s, s, px + rng.normal(0, 6) * sc, py + rng.normal(0, 6) * sc, r, soft=0.5))
        a = a * inside
        out = _mix(clean, a, vis.target(clean, a, np.array(_pick(rng, [(40, 35, 30), (90, 60, 40), (30, 40, 90)]),
                                                             np.float32)))
    elif defect == "dent":  # a pressed-in hollow: shadowed on the lit side, brighter on the other
        r = vis.extent(rng.uniform(6.0, 15.0) * sc)
        a = _blob(rng, s, s, px, py, r, soft=r * 0.3, irregular=0.3) * inside
        lit = _shadow(a, 2.0 * sc * math.cos(light), 2.0 * sc * math.sin(light), 1.0 * sc)
        out = _scale(clean, np.clip(a - lit, 0.0, 1.0), vis.factor(0.6))
        out = _scale(out, np.clip(lit - a, 0.0, 1.0) * inside, vis.factor(1.2))
    elif defect == "split":  # broken across: a wedge of the tablet missing from the rim inwards
        edge_t = rng.uniform(0, 2 * np.pi)
        ex = cx + rx * math.cos(edge_t) * ca - ry * math.sin(edge_t) * sa
        ey = cy + rx * math.cos(edge_t) * sa + ry * math.sin(edge_t) * ca
        r = vis.extent(rng.uniform(8.0, 20.0) * sc)
        bite = _polygon_alpha(s, s, _blob_outline(rng, ex, ey, r, 0.6, n=7), 0.5)
        out = compose(bite)
    else:
        raise ValueError(f"pill has no defect type {defect!r}")
    return clean, out


# --------------------------------------------------------------------------------------
# KolektorSDD2-like: brushed grey surface, tall and narrow


def _render_ksdd2(rng: np.random.Generator, w: int, h: int, defective: bool,
                  vis: Visibility = _REFERENCE) -> tuple[Array, Array | None]:
    sc = w / 116.0
    yy, xx = _coords(h, w)
    base = rng.uniform(85.0, 150.0)
    tint = (1.0 + rng.normal(0.0, 0.025, 3)).astype(np.float32)
    streaks = _grain(rng, h, w, 0.7 * sc, rng.uniform(15.0, 40.0) * sc) * rng.uniform(3.0, 9.0)
    grain = _grain(rng, h, w, 0.6, 0.6) * rng.uniform(2.0, 5.0)
    low = _smooth_noise(rng, h, w, 50 * sc) * rng.uniform(3.0, 10.0)
    band = np.exp(-(((xx - rng.uniform(0, w)) / (rng.uniform(8, 30) * sc)) ** 2)) * rng.normal(0.0, 8.0)
    img = (base + streaks + grain + low + band) * _lighting(rng, h, w, 0.12)
    # benign surface marks: faint streaks along the brushing direction, and shallow pits
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 4))):
            px, py, pr = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.0, 2.5) * sc
            img = img - rng.uniform(3.0, 7.0) * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * pr**2))
    if rng.random() < 0.6:
        x0 = rng.uniform(0.1, 0.9) * w
        y0, half_len = rng.uniform(0, h), rng.uniform(20, 80) * sc
        mark = np.exp(-(((xx - x0) / (0.8 * sc)) ** 2)) * np.exp(-(((yy - y0) / half_len) ** 2))
        img = img + mark * rng.normal(0.0, 6.0)
    clean = img[..., None] * tint
    if not defective:
        return clean, None
    out = clean.copy()
    for _ in range(1 if rng.random() < 0.8 else 2):
        kind = _pick(rng, ["scratch", "spot", "crack", "smear"], [0.4, 0.3, 0.15, 0.15])
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.08, 0.92) * h
        if kind == "scratch":
            heading = rng.uniform(0, 2 * np.pi)
            path = _smooth_curve(rng, np.array([cx, cy]), heading, vis.extent(rng.uniform(20.0, 140.0) * sc), 0.06,
                                 n=12)
            a = _polyline_alpha(h, w, path, vis.width(int(rng.integers(1, 3)))) * vis.opacity(rng.uniform(0.6, 1.0))
        elif kind == "spot":
            r = vis.extent(rng.uniform(2.5, 9.0) * sc)
            a = _blob(rng, h, w, cx, cy, r, soft=0.6, irregular=0.3)
        elif kind == "crack":
            a = _crack_alpha(rng, h, w, np.array([cx, cy]), rng.uniform(0, 2 * np.pi),
                             vis.extent(rng.uniform(12, 50) * sc), vis.width(int(rng.integers(1, 3))),
                             vis.extent(2.2 * sc), vis.width(1))
        else:
            r = vis.extent(rng.uniform(7.0, 20.0) * sc)
            a = _blob(rng, h, w, cx, cy, r, soft=r * 0.3, irregular=0.45, aspect=rng.uniform(0.3, 0.8))
            a = a * vis.opacity(rng.uniform(0.5, 0.9))
        if rng.random() < 0.7:
            out = _scale(out, a, vis.factor(rng.uniform(0.3, 0.85)))
        else:
            out = _mix(out, a, vis.target(out, a, rng.uniform(190.0, 250.0)))
    return clean, out


# --------------------------------------------------------------------------------------
# category registry


@dataclass(frozen=True)
class CategorySpec:
    """One synthetic MVTec-layout category."""

    name: str
    mode: Literal["L", "RGB"]
    kind: Literal["texture", "object"]
    defect_types: tuple[str, ...]
    render: Renderer


CATEGORIES: dict[str, CategorySpec] = {
    spec.name: spec
    for spec in (
        CategorySpec("carpet", "RGB", "texture", ("color", "cut", "hole", "thread"), _render_carpet),
        CategorySpec("grid", "L", "texture", ("bent", "broken", "glue", "metal_contamination"), _render_grid),
        CategorySpec("capsule", "RGB", "object", ("crack", "faulty_imprint", "misplaced", "scratch"), _render_capsule),
        CategorySpec("ring", "L", "object", ("chip", "contamination", "crack", "scratch"), _render_ring),
        CategorySpec("tile", "L", "texture", ("hairline", "spall", "stain"), _render_tile),
        CategorySpec("leather", "RGB", "texture", ("fold", "poke", "scuff"), _render_leather),
        CategorySpec("pill", "RGB", "object", ("dent", "speck", "split"), _render_pill),
    )
}
DEFAULT_CATEGORIES: tuple[str, ...] = ("carpet", "grid", "capsule", "ring")
# categories with their own defect kinds, for pretraining stand-in models (never in the embedded evaluation)
WORLD_CATEGORIES: tuple[str, ...] = ("tile", "leather", "pill")
KSDD2_MODE: Literal["RGB"] = "RGB"  # the real set stores 3-channel PNGs of grey surfaces


# --------------------------------------------------------------------------------------
# one sample


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


# --------------------------------------------------------------------------------------
# writing the layouts


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
            from rich.progress import track

            for _ in track(results, total=len(jobs), description=label, transient=True):
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


# --------------------------------------------------------------------------------------
# difficulty probe


def image_features(img: Array) -> Array:
    """Global hand-made features of one image: intensity and gradient statistics (and colour for RGB)."""
    arr = np.asarray(img, np.float32)
    grey = arr.mean(axis=2) if arr.ndim == 3 else arr
    q = np.percentile(grey, [0.5, 5, 50, 95, 99.5])
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    g = np.hypot(gx, gy)
    lap = np.abs(cv2.Laplacian(grey, cv2.CV_32F))
    feats = [grey.mean(), grey.std(), *q, g.mean(), g.std(), np.percentile(g, 99.5), lap.mean(),
             np.percentile(lap, 99.5)]
    if arr.ndim == 3:
        feats += list(arr.reshape(-1, 3).mean(0)) + list(arr.reshape(-1, 3).std(0))
    return np.asarray(feats, np.float64)


def _logreg_cv(x: Array, y: Array, folds: int, seed: int, l2: float = 1e-2, steps: int = 400) -> float:
    """Balanced accuracy of a class-weighted L2 logistic regression, k-fold cross-validated."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    pred = np.zeros(len(y), np.int64)
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-9
        xt = np.hstack([(x[train] - mu) / sd, np.ones((len(train), 1))])
        xv = np.hstack([(x[test] - mu) / sd, np.ones((len(test), 1))])
        yt = y[train].astype(np.float64)
        wts = np.where(yt == 1, 0.5 / max(yt.mean(), 1e-9), 0.5 / max(1 - yt.mean(), 1e-9))
        beta = np.zeros(xt.shape[1])
        for _ in range(steps):
            p = 1.0 / (1.0 + np.exp(-np.clip(xt @ beta, -30, 30)))
            grad = xt.T @ ((p - yt) * wts) / len(yt) + l2 * np.r_[beta[:-1], 0.0]
            beta -= 0.5 * grad
        pred[test] = (xv @ beta > 0).astype(np.int64)
    tpr = (pred[y == 1] == 1).mean()
    tnr = (pred[y == 0] == 0).mean()
    return float((tpr + tnr) / 2)


def quality_probe(root: str | Path, *, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """How far a linear model on global image statistics gets: balanced CV accuracy per dataset part.

    `root` is a folder written by `generate_all`. Keys are the MVTec-layout categories and "ksdd2".
    A value near 1.0 would mean the defects are detectable without looking at local structure.
    """
    root = Path(root)
    out: dict[str, float] = {}
    mvtec = root / "mvtec_ad"
    for cat_dir in sorted(p for p in mvtec.iterdir() if p.is_dir()):
        files = sorted((cat_dir / "train" / "good").glob("*.png")) + sorted((cat_dir / "test").glob("*/*.png"))
        labels = np.array([int(p.parent.name != "good") for p in files])
        feats = np.stack([image_features(np.asarray(Image.open(p))) for p in files])
        out[cat_dir.name] = _logreg_cv(feats, labels, folds, seed)
    ksdd2 = root / "ksdd2"
    if ksdd2.is_dir():
        images = sorted(p for p in ksdd2.glob("*/*.png") if not p.stem.endswith("_GT"))
        labels = np.array([int(np.asarray(Image.open(p.with_name(p.stem + "_GT.png"))).any()) for p in images])
        feats = np.stack([image_features(np.asarray(Image.open(p))) for p in images])
        out["ksdd2"] = _logreg_cv(feats, labels, folds, seed)
    return out
