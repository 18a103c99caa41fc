"""Image decoding for the cloud branch: open, convert to RGB, resize; five crops for TTA."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class UnreadableImageError(RuntimeError):
    """An image file cannot be decoded; the message names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def load_rgb(path: str | Path, resize: int | None) -> Image.Image:
    """Decode `path` fully as RGB (16-bit and palette images included) and resize to resize x resize."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I"):  # 16-bit grey: map 0..65535 onto 0..255
                arr = np.asarray(im, dtype=np.float64) / 257.0
                im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports corrupt data with these
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from exc
    if resize is not None and rgb.size != (resize, resize):
        rgb = rgb.resize((resize, resize), Image.Resampling.BICUBIC)
    return rgb


def five_crops(image: Image.Image, size: int) -> list[Image.Image]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops, each size x size.

    An image smaller than `size` on a side is first scaled up so its shorter side equals `size`.
    """
    w, h = image.size
    if min(w, h) < size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    cx, cy = (w - size) // 2, (h - size) // 2
    boxes = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size), (cx, cy)]
    return [image.crop((x, y, x + size, y + size)) for x, y in boxes]
