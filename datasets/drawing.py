"""Drawing primitives of the synthetic generator, vectorised over the image, and how defect
visibility scales a defect (`Visibility`).

`SyntheticConfig.defect_visibility` (v, 1.0 by default) makes every defect larger and
stronger from the same random draws (see `Visibility`): line widths and the gap of a cut
or break grow by v, lengths and radii by sqrt(v) (so a blob covers about v times the
area), multiplicative darkening or tinting f becomes f**v, opacities a become 1-(1-a)**v,
blend targets move v times farther from the surface they cover, and displacements
(misplaced capsules, bent wires) grow towards their visible limit; the radius of a bend
stays, since a wider bend of the same depth would be gentler. At v = 1 every image
is bit for bit what it was before the knob existed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

Array = np.ndarray


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
