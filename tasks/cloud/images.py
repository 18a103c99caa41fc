"""Image decoding for the cloud branch: open, convert to RGB, resize; five crops for TTA; the
Qwen2-VL processor's pixel preparation (resize, normalise, patch order) as torch operations."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from saec.errors import ActionableError


class UnreadableImageError(ActionableError, RuntimeError):
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


# The dihedral group of the square as PIL operations, None the identity. Training draws indices
# into it (its "flip" augmentation uses the first two), so the order is part of every recipe.
DIHEDRAL = (
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def dihedral_views(image: Image.Image) -> list[Image.Image]:
    """The image under the eight flips and quarter turns of a square, the identity first."""
    return [image if op is None else image.transpose(op) for op in DIHEDRAL]


# --------------------------------------------------------------------------- processor-free pixels


@dataclass(frozen=True)
class PatchLayout:
    """What a Qwen2-VL-style image processor does to an image, read from the loaded processor.

    The processor resizes each image to multiples of patch_size * merge_size within
    [min_pixels, max_pixels] (`smart_resize`), rescales and normalises it in float32, repeats it
    over temporal_patch_size frames and cuts it into rows of (channel, frame, patch, patch)
    values, the 2x2 merge groups of patches contiguous. `patches_from_uint8` does the same with
    torch operations on a uint8 batch of same-size images, on any device.
    """

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    do_rescale: bool
    do_normalize: bool
    min_pixels: int
    max_pixels: int
    resample: Any
    torchvision_resize: bool  # the processor resizes with torchvision, which `resize_like_processor` mirrors
    smart_resize: Callable[..., tuple[int, int]] = field(compare=False, repr=False)

    @classmethod
    def from_processor(cls, processor) -> PatchLayout | None:
        """The layout of `processor`'s image processor, or None if it is not a Qwen2-VL-style one."""
        ip = getattr(processor, "image_processor", processor)
        module = sys.modules.get(type(ip).__module__)
        smart = getattr(module, "smart_resize", None)
        need = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
        if smart is None or any(getattr(ip, n, None) is None for n in need):
            return None
        size = getattr(ip, "size", None) or {}

        def size_field(name: str):
            return size.get(name) if isinstance(size, dict) else getattr(size, name, None)

        min_pixels = size_field("shortest_edge") or getattr(ip, "min_pixels", None)
        max_pixels = size_field("longest_edge") or getattr(ip, "max_pixels", None)
        if not min_pixels or not max_pixels:
            return None
        mro = {c.__name__ for c in type(ip).__mro__}
        return cls(
            patch_size=int(ip.patch_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            merge_size=int(ip.merge_size),
            image_mean=tuple(float(v) for v in ip.image_mean),
            image_std=tuple(float(v) for v in ip.image_std),
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            do_rescale=bool(getattr(ip, "do_rescale", True)),
            do_normalize=bool(getattr(ip, "do_normalize", True)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            resample=getattr(ip, "resample", None),
            torchvision_resize=bool(mro & {"TorchvisionBackend", "BaseImageProcessorFast"}),
            smart_resize=smart,
        )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes an image of this size to."""
        h, w = self.smart_resize(height, width, factor=self.patch_size * self.merge_size,
                                 min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return int(h), int(w)

    def handles(self, height: int, width: int) -> bool:
        """Whether `resize_like_processor` reproduces the processor exactly for images of this size."""
        return self.target_size(height, width) == (height, width) or self.torchvision_resize

    def resize_like_processor(self, array: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 image resized exactly as the processor resizes it (unchanged at a target size)."""
        th, tw = self.target_size(array.shape[0], array.shape[1])
        if (th, tw) == array.shape[:2]:
            return array
        if not self.torchvision_resize:
            raise ValueError(f"the processor's own resize of {array.shape[:2]} is not reproduced here")
        import torch
        from torchvision.transforms.v2 import functional as tvF

        mode = self.resample
        if not isinstance(mode, tvF.InterpolationMode):
            from transformers.image_utils import pil_torch_interpolation_mapping

            mode = pil_torch_interpolation_mapping[mode] if mode is not None else tvF.InterpolationMode.BILINEAR
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array)  # torch wants its own writable buffer (PIL's arrays are read-only)
        chw = torch.from_numpy(array).permute(2, 0, 1)
        return tvF.resize(chw, [th, tw], interpolation=mode, antialias=True).permute(1, 2, 0).numpy()

    def normalizer(self, device) -> tuple[Any, Any, float | None]:
        """(mean, std, scale) as the processor applies them: x * scale, or (x - mean) / std, in float32.

        Rescale and normalise are fused the processor's way (mean and std times 1 / rescale_factor,
        computed on the CPU in float32), so the values agree with the processor's bit for bit up to
        the order of float32 operations.
        """
        import torch

        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32)
            std = torch.tensor(self.image_std, dtype=torch.float32)
            if self.do_rescale:
                mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
            return mean.to(device).view(-1, 1, 1), std.to(device).view(-1, 1, 1), None
        return None, None, self.rescale_factor if self.do_rescale else 1.0


def patches_from_uint8(pixels, layout: PatchLayout, dtype=None, normalizer=None):
    """pixel_values for a [B, H, W, 3] uint8 batch of images at a target size: [B*gh*gw, C*T*P*P].

    Rescale/normalise in float32, then (in `dtype`, default float32) the processor's patch order:
    per image, merge groups row-major, the merge_size x merge_size patches of a group row-major,
    each patch as (channel, frame, row, column) with the frame repeated temporal_patch_size times.
    """
    import torch

    b, h, w, c = pixels.shape
    p, m, t = layout.patch_size, layout.merge_size, layout.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"{h}x{w} is not a multiple of {p * m}: resize like the processor first")
    mean, std, scale = normalizer if normalizer is not None else layout.normalizer(pixels.device)
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)
    x = x.sub_(mean).div_(std) if mean is not None else x.mul_(scale)
    if dtype is not None:
        x = x.to(dtype)
    gh, gw = h // p, w // p
    x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(b, gh // m, gw // m, m, m, c, t, p, p)
    return x.reshape(b * gh * gw, c * t * p * p)
