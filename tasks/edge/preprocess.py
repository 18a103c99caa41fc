"""Image decoding and Ultralytics-equivalent classification preprocessing, in a thread pool.

Ultralytics' classifier, given a file, reads it with OpenCV (BGR, 8-bit, EXIF-rotated),
resizes its shortest side to `imgsz` with PIL's antialiased bilinear filter
(torchvision ``Resize``), centre-crops `imgsz` x `imgsz` (torchvision ``CenterCrop``),
flips to RGB and divides by 255 (its normalisation is mean 0, std 1). `classify_uint8`
reproduces that bit for bit; the division happens once per batch in `to_nchw_float`.

Decoding (OpenCV) and resizing (PIL) release the GIL, so `iter_batches` decodes the next
batches on worker threads while the caller runs inference on the current one.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

from saec.datasets.images import BadImage, load_image


def decode_bgr(path: str | Path) -> np.ndarray:
    """An image file as an 8-bit BGR array (H, W, 3), read the way Ultralytics reads it.

    Files OpenCV cannot decode go through the project's PIL reader, which either decodes
    them (rare formats and modes) or raises `BadImage` with the reason and the file name.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise BadImage(path, "missing_file", "the image file does not exist") from None
    except OSError as exc:
        raise BadImage(path, "unreadable_file", str(exc)) from None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        rgb = np.asarray(load_image(path, "RGB"))  # raises BadImage naming the file if it cannot be used
        img = np.ascontiguousarray(rgb[..., ::-1])
    return img


def resized_size(width: int, height: int, imgsz: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(imgsz): shortest side to imgsz, aspect kept."""
    if width <= height:
        return imgsz, int(imgsz * height / width)
    return int(imgsz * width / height), imgsz


def classify_uint8(bgr: np.ndarray, imgsz: int) -> np.ndarray:
    """Resize (shortest side, PIL bilinear) + centre crop to (imgsz, imgsz, 3) RGB uint8."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    new_w, new_h = resized_size(w, h, imgsz)
    pil = Image.fromarray(rgb)
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - imgsz) / 2.0))
    left = int(round((new_w - imgsz) / 2.0))
    out = np.asarray(pil.crop((left, top, left + imgsz, top + imgsz)))
    return out


def load_classify(path: str | Path, imgsz: int) -> np.ndarray:
    return classify_uint8(decode_bgr(path), imgsz)


def to_nchw_float(batch_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 in [0, 1], C-contiguous (x / 255, as Ultralytics)."""
    out = np.empty((batch_uint8.shape[0], 3, *batch_uint8.shape[1:3]), dtype=np.float32)
    np.divide(batch_uint8.transpose(0, 3, 1, 2), np.float32(255.0), out=out, casting="unsafe")
    return out


def iter_batches(
    paths: Sequence[str],
    imgsz: int,
    batch_size: int,
    workers: int,
    prefetch_batches: int = 2,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, uint8 batch (n, imgsz, imgsz, 3)) in order, decoding ahead on threads.

    At most (prefetch_batches + 1) * batch_size images are in flight. An unreadable image
    raises `BadImage` (naming the file) from the batch that holds it.
    """
    n = len(paths)
    window = (prefetch_batches + 1) * batch_size
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edge-decode") as pool:
        pending: deque[Future] = deque()
        submitted = 0

        def fill() -> None:
            nonlocal submitted
            while submitted < n and len(pending) < window:
                pending.append(pool.submit(load_classify, paths[submitted], imgsz))
                submitted += 1

        try:
            for start in range(0, n, batch_size):
                fill()
                stop = min(start + batch_size, n)
                batch = np.empty((stop - start, imgsz, imgsz, 3), dtype=np.uint8)
                for j in range(stop - start):
                    batch[j] = pending.popleft().result()
                fill()  # keep the workers busy while the caller runs this batch
                yield start, stop, batch
        finally:
            for fut in pending:
                fut.cancel()
