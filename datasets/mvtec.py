"""Reader of the MVTec AD folder layout.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/*.png
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png

A category is a folder holding `train/` and `test/`; `ground_truth/` is optional,
and a defect image without a mask is still a defect (the folder says so). Any
image format Pillow reads is accepted, in any mode and size.
"""
from __future__ import annotations

from pathlib import Path

from saec.datasets.images import DEFAULT_MAX_PIXELS, is_image_name
from saec.datasets.scan import Candidate, LayoutError, Quarantine, ScanResult, ambiguous, list_dir, probe_candidates

LAYOUT = (
    "<root>/<category>/train/good/, <root>/<category>/test/good/, <root>/<category>/test/<defect_type>/ "
    "and optionally <root>/<category>/ground_truth/<defect_type>/<name>_mask.png"
)
GOOD = "good"


def _find_child(folder: Path, name: str) -> Path | None:
    """The child folder `name`, or raise if it exists only under another spelling."""
    exact = folder / name
    if exact.is_dir():
        return exact
    for p in folder.iterdir() if folder.is_dir() else []:
        if p.is_dir() and p.name.lower() == name.lower():
            raise LayoutError(f"{p} should be named '{name}' (MVTec AD folder names are lower case); rename it")
    return None


def _images_in(folder: Path, q: Quarantine) -> list[Path]:
    dirs, files = list_dir(folder, q)
    out = []
    for f in files:
        if is_image_name(f) and not f.name.startswith("."):
            out.append(f)
        else:
            q.add(f, "image", "not_an_image_name", f"suffix {f.suffix or '(none)'!r} is not an image format")
    for d in dirs:
        q.add(d, "folder", "unexpected_folder", "class folders hold image files only")
    return out


def check_root(root: str | Path) -> None:
    """Fail at once on the mistakes of a whole root: missing, or no folder under it holds train/ or
    test/ (an empty folder, a KolektorSDD2 folder, the parent of the root). Reads folder names only,
    so a command can check before it starts any work; `read_mvtec` checks the rest as it scans."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"MVTec AD root {root} does not exist or is not a folder (data.mvtec_root)")
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return  # the scan quarantines what it cannot read, and says so
    if not any(_is_category(d) for d in subs):
        _no_category(root, subs)


def _is_category(folder: Path) -> bool:
    try:
        return _find_child(folder, "train") is not None or _find_child(folder, "test") is not None
    except OSError:
        return False  # unreadable: quarantined by the scan


def _no_category(root: Path, sub_dirs: list[Path]) -> None:
    found = ", ".join(d.name for d in sub_dirs) or "nothing"
    raise LayoutError(f"no MVTec AD category under {root} (found: {found}); expected {LAYOUT}")


def read_mvtec(
    root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False, workers: int | None = None
) -> ScanResult:
    root = Path(root)
    check_root(root)
    q = Quarantine("mvtec_ad", root)
    cands: list[Candidate] = []
    notes = {"empty_class_folders": 0}
    categories = []
    sub_dirs, root_files = list_dir(root, q)
    for f in root_files:
        if is_image_name(f):
            q.add(f, "image", "outside_layout", "an image directly under the root belongs to no category")
    for cat_dir in sub_dirs:
        train = _find_child(cat_dir, "train")
        test = _find_child(cat_dir, "test")
        if train is None and test is None:
            q.add(cat_dir, "folder", "not_a_category", "holds neither train/ nor test/")
            continue
        if train is None or test is None:
            missing = "train/" if train is None else "test/"
            raise LayoutError(f"category {cat_dir.name!r} has no {missing} folder ({cat_dir}); expected {LAYOUT}")
        categories.append(cat_dir.name)
        cat = cat_dir.name
        # train: only good images
        train_classes, train_files = list_dir(train, q)
        for f in train_files:
            q.add(f, "image", "outside_layout", "files directly under train/ belong to no class; move them to train/good/")
        train_good = _find_child(train, GOOD)
        if train_good is None:
            found = ", ".join(d.name for d in train_classes) or "nothing"
            raise LayoutError(f"category {cat!r}: {train} must hold a good/ folder (found {found}); expected {LAYOUT}")
        for d in train_classes:
            if d.name != GOOD:
                raise LayoutError(
                    f"category {cat!r}: train/{d.name}/ is not part of MVTec AD (train/ holds only good/); "
                    f"move defect images under test/<defect_type>/"
                )
        # test: good and defect types
        test_classes, test_files = list_dir(test, q)
        for f in test_files:
            q.add(f, "image", "outside_layout", "files directly under test/ belong to no class")
        if _find_child(test, GOOD) is None:
            raise LayoutError(f"category {cat!r}: {test} has no good/ folder; expected {LAYOUT}")
        gt = _find_child(cat_dir, "ground_truth")
        masks: dict[tuple[str, str], Path] = {}
        if gt is not None:
            gt_dirs, gt_files = list_dir(gt, q)
            for f in gt_files:
                q.add(f, "mask", "outside_layout", "files directly under ground_truth/ belong to no defect type")
            for d in gt_dirs:
                named = []
                for m in _images_in(d, q):
                    if not m.stem.endswith("_mask"):
                        q.add(m, "mask", "misnamed_mask", f"expected <image name>_mask{m.suffix}")
                        continue
                    named.append(m)
                unique, clashes = ambiguous(named, lambda m: m.stem[: -len("_mask")])
                for group in clashes:  # 000_mask.png and 000_mask.bmp: which one is the mask?
                    for m in group:
                        others = ", ".join(o.name for o in group if o != m)
                        q.add(m, "mask", "ambiguous_stem", f"{d.name}/{m.name} and {others} are masks of one image; keep one")
                masks.update({(d.name, stem): m for stem, m in unique.items()})
        used_masks: set[Path] = set()
        for split_dir, classes in ((train, [train_good]), (test, test_classes)):
            for cls_dir in classes:
                files = _images_in(cls_dir, q)
                if not files:
                    notes["empty_class_folders"] += 1
                    q.add(cls_dir, "folder", "empty_class_folder", "holds no image files")
                    continue
                is_good = cls_dir.name == GOOD
                stems: dict[str, list[Path]] = {}
                for f in files:
                    stems.setdefault(f.stem, []).append(f)
                for f in files:
                    mask = None if is_good else masks.get((cls_dir.name, f.stem))
                    if mask is not None and len(stems[f.stem]) > 1:  # 000.png and 000.bmp share 000_mask.png
                        others = ", ".join(o.name for o in stems[f.stem] if o != f)
                        if mask not in used_masks:
                            q.add(mask, "mask", "ambiguous_stem", f"it would be the mask of {f.name} and of {others}; "
                                                                  "rename the images or the mask")  # fmt: skip
                        used_masks.add(mask)
                        mask = None
                    elif mask is not None:
                        used_masks.add(mask)
                    cands.append(
                        Candidate(
                            path=f,
                            rel_path=f.relative_to(root).as_posix(),
                            label=0 if is_good else 1,
                            category=cat,
                            defect_type=cls_dir.name,
                            split=split_dir.name,
                            root=root,
                            mask_path=str(mask) if mask is not None else None,
                        )
                    )
        for m in sorted(set(masks.values()) - used_masks):
            q.add(m, "mask", "mask_without_image", f"no test/{m.parent.name}/{m.stem[:-5]}.* image for this mask")
    if not categories:
        _no_category(root, sub_dirs)
    notes["defect_with_empty_mask"] = 0
    images = probe_candidates(cands, "mvtec_ad", q, max_pixels, workers=workers, progress=progress, check_masks=True,
                              notes=notes)  # fmt: skip
    notes["categories"] = len(categories)
    notes["defect_without_mask"] = int(((images.label == 1) & images.mask_path.isna()).sum())
    return ScanResult(images=images, quarantine=q.frame(), notes=notes)
