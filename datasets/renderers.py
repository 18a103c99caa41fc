"""The synthetic categories: one renderer per category, each drawing a defect-free scene and,
when asked, one defect of its kinds on it (the generator in `synthetic.py` derives the mask).

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import numpy as np

from saec.datasets.drawing import (  # the generator's own drawing kit, shared by the renderers
    Array,
    _blob,
    _blob_outline,
    _coords,
    _crack_alpha,
    _erode,
    _grain,
    _lighting,
    _line_width,
    _mix,
    _pick,
    _polygon_alpha,
    _polyline_alpha,
    _REFERENCE,
    _scale,
    _scratch,
    _shadow,
    _smooth_curve,
    _smooth_noise,
    Visibility,
)

Renderer = Callable[[np.random.Generator, int, "str | None", "Visibility"], tuple[Array, "Array | None"]]


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
