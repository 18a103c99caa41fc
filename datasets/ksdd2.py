"""Reader of the KolektorSDD2 raw layout.

    <root>/train/NNNNN.png  beside  <root>/train/NNNNN_GT.png
    <root>/test/NNNNN.png   beside  <root>/test/NNNNN_GT.png

The mask decides the label: an image is a defect iff its mask has a non-zero pixel (in any
channel: a colour mask with faint values is still a mask). An image without its mask has no
label and is quarantined; so is a mask without its image, a mask whose size differs from its
image, and a stem that two images or two masks share (`99007.png` and `99007.bmp`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from PIL import Image

from saec.datasets.images import DEFAULT_MAX_PIXELS, BadImage, is_image_name, mask_array
from saec.datasets.scan import Candidate, LayoutError, Quarantine, ScanResult, ambiguous, list_dir, probe_candidates

SPLITS = ("train", "test")
MASK_SUFFIX = "_GT"
LAYOUT = "<root>/train/NNNNN.png with NNNNN_GT.png beside it, and the same under <root>/test/"


def _mask_label(image: Path, mask: Path, max_pixels: int) -> tuple[int | None, str, str]:
    """(label, reason, detail); label None when the mask cannot decide it.

    The image itself is decoded later with every other image; here only its header is read.
    """
    try:
        m = mask_array(mask, max_pixels)
    except BadImage as exc:
        return None, f"mask_{exc.reason}", exc.detail
    try:
        with Image.open(image) as img:
            size = img.size
    except (OSError, Image.DecompressionBombError):
        return 1, "", ""  # the label does not matter: the image is quarantined when it is decoded
    if (m.shape[1], m.shape[0]) != size:
        return None, "mask_size_mismatch", f"mask {m.shape[1]}x{m.shape[0]} vs image {size[0]}x{size[1]}"
    return int(m.any()), "", ""


def check_root(root: str | Path) -> list[Path]:
    """The split folders of a KolektorSDD2 root; fails at once when it is missing or holds neither
    train/ nor test/ (an MVTec AD folder, an empty one). Reads folder names only, so a command can
    check before it starts any work."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"KolektorSDD2 root {root} does not exist or is not a folder (data.ksdd2_root)")
    split_dirs = []
    for name in SPLITS:
        exact = root / name
        if exact.is_dir():
            split_dirs.append(exact)
            continue
        for p in root.iterdir():
            if p.is_dir() and p.name.lower() == name:
                raise LayoutError(f"{p} should be named '{name}'; rename it (expected {LAYOUT})")
    if not split_dirs:
        found = ", ".join(p.name for p in sorted(root.iterdir())) or "nothing"
        raise LayoutError(f"no train/ or test/ folder under {root} (found: {found}); expected {LAYOUT}")
    return split_dirs


def read_ksdd2(
    root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False, workers: int | None = None
) -> ScanResult:
    root = Path(root)
    split_dirs = check_root(root)
    q = Quarantine("ksdd2", root)
    notes = {"splits_missing": len(SPLITS) - len(split_dirs)}
    pairs: list[tuple[Path, Path, str]] = []
    for split in split_dirs:
        dirs, files = list_dir(split, q)
        for d in dirs:
            q.add(d, "folder", "unexpected_folder", f"{split.name}/ holds image and mask files only")
        image_files, mask_files = [], []
        for f in files:
            if not is_image_name(f) or f.name.startswith("."):
                q.add(f, "image", "not_an_image_name", f"suffix {f.suffix or '(none)'!r} is not an image format")
            elif f.stem.endswith(MASK_SUFFIX):
                mask_files.append(f)
            else:
                image_files.append(f)
        images, image_clashes = ambiguous(image_files, lambda f: f.stem)
        masks, mask_clashes = ambiguous(mask_files, lambda f: f.stem[: -len(MASK_SUFFIX)])
        if not image_files and not mask_files:
            q.add(split, "folder", "empty_class_folder", "holds no image files")
        for kind, group in [("image", g) for g in image_clashes] + [("mask", g) for g in mask_clashes]:
            stem = group[0].stem.removesuffix(MASK_SUFFIX)
            for f in group:  # which one is the sample (or its mask)? keep one
                others = ", ".join(o.name for o in group if o != f)
                q.add(f, kind, "ambiguous_stem", f"{f.name} and {others} share the stem {stem}; keep one")
            partner = (masks if kind == "image" else images).pop(stem, None)
            if partner is not None:  # the other half of an ambiguous pair cannot be paired either
                q.add(partner, "mask" if kind == "image" else "image", "ambiguous_stem",
                      f"its {kind} is ambiguous: {', '.join(o.name for o in group)}")  # fmt: skip
        for stem, img in sorted(images.items()):
            if stem in masks:
                pairs.append((img, masks[stem], split.name))
            else:
                q.add(img, "image", "image_without_mask", f"no {stem}{MASK_SUFFIX}.png beside it, so its label is unknown")
        for stem in sorted(set(masks) - set(images)):
            q.add(masks[stem], "mask", "mask_without_image", f"no {stem}.* image beside this mask")

    with ThreadPoolExecutor(workers or 4) as pool:
        labels = list(pool.map(lambda p: _mask_label(p[0], p[1], max_pixels), pairs))
    cands = []
    for (img, mask, split), (label, reason, detail) in zip(pairs, labels):
        if label is None:
            q.add(img, "image", reason, detail)
            q.add(mask, "mask", reason, f"the mask of {img.name}" + (f": {detail}" if detail else ""))
            continue
        cands.append(
            Candidate(
                path=img,
                rel_path=img.relative_to(root).as_posix(),
                label=label,
                category="ksdd2",
                defect_type="defect" if label else "good",
                split=split,
                root=root,
                mask_path=str(mask),
            )
        )
    frame = probe_candidates(cands, "ksdd2", q, max_pixels, workers=workers, progress=progress)
    return ScanResult(images=frame, quarantine=q.frame(), notes=notes)
