"""Reading image files safely: validate, describe, and decode to the modes the models take.

Every image is fully decoded once when a dataset is scanned, so a zero-byte,
truncated or non-image file is caught there, with its reason, rather than halfway
through a model run. Oversized images (decompression bombs) are refused from their
header, before any pixel is decoded.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; real inspection frames are far below this

# Never let PIL pad a truncated file with grey: a truncated file is bad input.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(ValueError):
    """An image file that cannot be used; `reason` is a short stable code for the quarantine table."""

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str
    format: str
    bytes: int


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _open(path: Path, max_pixels: int) -> Image.Image:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        broken = path.is_symlink()
        raise BadImage(path, "broken_link" if broken else "missing_file",
                       "a link to a file that does not exist" if broken else "the file does not exist") from None
    except OSError as exc:
        raise BadImage(path, "unreadable", exc.strerror or str(exc)) from None
    if size == 0:
        raise BadImage(path, "empty_file", "the file has zero bytes; re-copy it from the source")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError:
        raise BadImage(path, "not_an_image", "no image format recognises its bytes") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(path, "too_large", str(exc)) from None
    except Image.DecompressionBombWarning as exc:
        raise BadImage(path, "too_large", str(exc)) from None
    if img.width * img.height > max_pixels:
        img.close()
        raise BadImage(
            path,
            "too_large",
            f"{img.width}x{img.height} exceeds the limit of {max_pixels} pixels (scan.max_pixels)",
        )
    return img


def probe_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode the whole file once and describe it; raise BadImage if it cannot be used."""
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        mode, fmt, (w, h) = img.mode, img.format or "", img.size
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(path, "truncated_or_corrupt", str(exc)) from None
        if w == 0 or h == 0:
            raise BadImage(path, "empty_image", f"size {w}x{h}")
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # multi-page files: the first page is the image, as every reader here uses it
    finally:
        img.close()
    return ImageInfo(width=w, height=h, mode=mode, format=fmt, bytes=path.stat().st_size)


def to_8bit(img: Image.Image) -> Image.Image:
    """Bring any PIL mode to 8-bit L or RGB without surprises.

    16-bit and 32-bit grey are scaled by their full range (16-bit: >> 8), palette images are
    expanded, alpha is composited onto black (the background of a backlit or masked part).
    """
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("1",):
        return img.convert("L")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8), mode="L")
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode == "I" and arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if mode == "LA" or (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "PA"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        base.alpha_composite(rgba)
        return base.convert("RGB")
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise ValueError(f"unsupported image mode {mode!r}")


def _decoded(path: Path, max_pixels: int) -> Image.Image:
    """The file's image, fully decoded as stored; BadImage if it cannot be."""
    img = _open(path, max_pixels)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        img.close()
        raise BadImage(path, "truncated_or_corrupt", str(exc)) from None
    return img


def load_image(path: str | Path, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file into an 8-bit PIL image of `mode` ("RGB" or "L")."""
    out = to_8bit(_decoded(Path(path), max_pixels))
    return out if out.mode == mode else out.convert(mode)


def mask_array(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A ground-truth mask as booleans (H, W): a pixel is a defect if any of its channels is non-zero.

    Masks are saved grey, colour or with a palette; a faint colour such as (1, 0, 0) still marks
    a defect (converted to grey it would round to 0). Raises BadImage for a mask that cannot be read.
    """
    img = _decoded(Path(path), max_pixels)
    if img.mode in ("1", "L", "RGB", "I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img)  # the stored values themselves: a 16-bit mask of 1s is a mask
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        arr = np.asarray(img.convert("LA" if img.mode == "LA" else "RGBA"))[..., :-1]  # colour, not alpha
    else:
        arr = np.asarray(img.convert("RGB"))  # palette, CMYK, YCbCr, ...: by colour
    return arr.any(axis=2) if arr.ndim == 3 else arr != 0


MAX_BOXES = 8  # a mask's regions beyond this many: the largest are kept


def mask_boxes(mask_path: str | Path) -> tuple[list[list[int]], int, int]:
    """Bounding boxes [x0, y0, x1, y1] (x1, y1 exclusive) of a mask's regions, top to bottom; and its size.

    Regions are 8-connected non-zero pixels. Specks under 4 pixels are left out when larger
    regions exist; beyond MAX_BOXES regions the largest are kept. Raises BadImage for a mask
    that cannot be read.
    """
    import cv2

    mask = mask_array(mask_path)
    h, w = mask.shape
    n, _labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    regions = [stats[i] for i in range(1, n)]  # x, y, width, height, area
    if any(r[4] >= 4 for r in regions):
        regions = [r for r in regions if r[4] >= 4]
    regions = sorted(regions, key=lambda r: -int(r[4]))[:MAX_BOXES]
    boxes = [[int(x), int(y), int(x + bw), int(y + bh)] for x, y, bw, bh, _a in regions]
    return sorted(boxes, key=lambda b: (b[1], b[0], b[2], b[3])), w, h
