"""Label-preserving augmentation of training images, drawn from (seed, epoch, example) so that a
resumed training sees exactly the images an uninterrupted one would (see `CloudTrainConfig`)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from saec.tasks.cloud.config import CloudTrainConfig
from saec.tasks.cloud.images import DIHEDRAL
if TYPE_CHECKING:
    from saec.tasks.cloud.sft_examples import Example


def augment_ops(cfg: CloudTrainConfig, epoch: int, examples: list[Example]) -> list[Image.Transpose | None]:
    """The geometric operation for every example in one epoch, fixed by (seed, epoch)."""
    if cfg.augment == "none":
        return [None] * len(examples)
    n_ops = 2 if cfg.augment == "flip" else len(DIHEDRAL)  # "flip": the identity and the left-right mirror
    draws = np.random.default_rng([cfg.seed, epoch, 0xA06]).integers(0, n_ops, len(examples))
    return [DIHEDRAL[d] if ok else None for d, ok in zip(draws, in_augment_categories(cfg, examples))]


def in_augment_categories(cfg: CloudTrainConfig, examples: list[Example]) -> list[bool]:
    """Per example: whether its category is one that augmentation applies to."""
    if cfg.augment_categories is None:
        return [True] * len(examples)
    allowed = set(cfg.augment_categories)
    return [ex.category in allowed for ex in examples]


@dataclass(frozen=True)
class Augmentation:
    """What happens to one training image in one epoch, in this order: flip or turn, shift, lighting."""

    transpose: Image.Transpose | None = None
    shift: tuple[int, int] | None = None  # (dx, dy) pixels, the uncovered border mirrored
    lighting: tuple[float, float] | None = None  # (brightness, contrast) factors

    def apply(self, image: Image.Image) -> Image.Image:
        if self.transpose is not None:
            image = image.transpose(self.transpose)
        if self.shift is not None:
            image = shift_image(image, *self.shift)
        if self.lighting is not None:
            image = relight_image(image, *self.lighting)
        return image


def augment_plan(cfg: CloudTrainConfig, epoch: int, examples: list[Example]) -> list[Augmentation | None]:
    """Every example's augmentation in one epoch, fixed by (seed, epoch); None = the image as it is.

    Each kind draws from its own random stream, so turning one on leaves the others' draws alone.
    """
    n = len(examples)
    turns = augment_ops(cfg, epoch, examples)
    applies = in_augment_categories(cfg, examples)
    shifts: list[tuple[int, int] | None] = [None] * n
    if cfg.augment_shift:
        k = cfg.augment_shift
        d = np.random.default_rng([cfg.seed, epoch, 0x5F7]).integers(-k, k + 1, (n, 2))
        shifts = [(int(x), int(y)) if ok else None for (x, y), ok in zip(d, applies)]
    lights: list[tuple[float, float] | None] = [None] * n
    if cfg.augment_lighting:
        a = cfg.augment_lighting
        f = np.random.default_rng([cfg.seed, epoch, 0xB21]).uniform(1 - a, 1 + a, (n, 2))
        lights = [(float(b), float(c)) if ok else None for (b, c), ok in zip(f, applies)]
    plan = [Augmentation(t, s, li) for t, s, li in zip(turns, shifts, lights)]
    return [None if aug == Augmentation() else aug for aug in plan]


def relight_image(image: Image.Image, brightness: float, contrast: float) -> Image.Image:
    """Contrast scaled about the image's mean, then brightness scaled; clipped to 0..255."""
    arr = np.asarray(image, dtype=np.float32)
    mean = arr.mean()
    out = ((arr - mean) * contrast + mean) * brightness
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode=image.mode)


def shift_image(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """`image` moved right by dx and down by dy pixels, the uncovered border filled by mirroring."""
    if dx == 0 and dy == 0:
        return image
    k = max(abs(dx), abs(dy))
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    if k >= min(h, w):
        raise ValueError(f"a shift of {k} px needs an image larger than {k} px on each side, not {w}x{h}")
    padded = np.pad(arr, ((k, k), (k, k)) + ((0, 0),) * (arr.ndim - 2), mode="reflect")
    y0, x0 = k - dy, k - dx
    return Image.fromarray(np.ascontiguousarray(padded[y0 : y0 + h, x0 : x0 + w]), mode=image.mode)


def check_augment(cfg: CloudTrainConfig, examples: list[Example]) -> int:
    """How many examples augmentation may transform; warns when none of the listed categories occur."""
    if cfg.augment == "none" and not cfg.augment_shift and not cfg.augment_lighting:
        return 0
    n = sum(in_augment_categories(cfg, examples))
    if n == 0 and cfg.augment_categories is not None:
        present = sorted({ex.category for ex in examples})
        warnings.warn(f"augmentation changes nothing: none of augment_categories "
                      f"{list(cfg.augment_categories)} occurs in the training data (its categories: {present})",
                      stacklevel=3)
    return n
