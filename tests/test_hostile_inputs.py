"""A corpus of broken and odd files in both layouts: every file is accounted for, and every image
the scan accepts can be read by every later stage.

The corpus holds what users bring: zero-byte, truncated and non-image files, RGBA, 16-bit,
palette, CMYK JPEG, multi-page and floating-point TIFF, a decompression-bomb header, names that
are not UTF-8, names with spaces and accents, byte-identical duplicates, empty class folders, a
link loop, links to files outside the root, broken links, masks of the wrong size, empty,
unreadable, doubled or faint, and two images sharing a stem.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import noise, save
from saec.datasets.ksdd2 import read_ksdd2
from saec.datasets.mvtec import read_mvtec
from saec.datasets.scan import printable


def _bomb_header(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims side x side pixels, with one byte of image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))  # fmt: skip
    return path


def _mask(path: Path, shape=(32, 32), value=255) -> Path:
    m = np.zeros(shape, np.uint8)
    m[4:12, 4:12] = value
    return save(path, m)


def mvtec_corpus(root: Path, outside: Path) -> dict[str, str]:
    """Write the corpus; return {relative path: the quarantine reason expected for it}."""
    expect: dict[str, str] = {}
    good, test, gt = root / "parts" / "train" / "good", root / "parts" / "test", root / "parts" / "ground_truth"
    for i in range(4):
        save(good / f"{i:03d}.png", noise((32, 32, 3), i))
    save(good / "with space é.png", noise((32, 32, 3), 50))  # a legal odd name: read
    (good / "004.png").write_bytes((good / "000.png").read_bytes())  # a duplicate
    expect["parts/train/good/004.png"] = "duplicate"
    (good / "empty.png").write_bytes(b"")
    expect["parts/train/good/empty.png"] = "empty_file"
    whole = save(good / "whole.png", noise((32, 32, 3), 60))
    (good / "cut.png").write_bytes(whole.read_bytes()[:200])
    expect["parts/train/good/cut.png"] = "truncated_or_corrupt"
    (good / "notes.png").write_text("not an image")
    expect["parts/train/good/notes.png"] = "not_an_image"
    (good / "readme.txt").write_text("x")
    expect["parts/train/good/readme.txt"] = "not_an_image_name"
    (good / ".hidden.png").write_bytes(whole.read_bytes())
    expect["parts/train/good/.hidden.png"] = "not_an_image_name"
    _bomb_header(good / "bomb.png")
    expect["parts/train/good/bomb.png"] = "too_large"
    (good / os.fsdecode(b"bad\xff\xfename.png")).write_bytes(whole.read_bytes()[:-1] + b"\x01")
    expect[printable(Path("parts/train/good") / os.fsdecode(b"bad\xff\xfename.png"))] = "undecodable_name"
    Image.fromarray(noise((32, 32, 4), 61), "RGBA").save(good / "rgba.png")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(good / "grey16.png")
    Image.fromarray(noise((32, 32, 3), 62)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(good / "pal.png")
    Image.fromarray(noise((32, 32, 3), 63)).convert("CMYK").save(good / "cmyk.jpg")
    pages = [Image.fromarray(noise((32, 32), k)) for k in (64, 65)]
    pages[0].save(good / "pages.tif", save_all=True, append_images=pages[1:])
    Image.fromarray(np.random.default_rng(66).random((32, 32), dtype=np.float32)).save(good / "float32.tif")
    (good / "broken_link.png").symlink_to(good / "nowhere.png")
    expect["parts/train/good/broken_link.png"] = "broken_link"
    save(outside / "far.png", noise((32, 32, 3), 67))
    (good / "far.png").symlink_to(outside / "far.png")  # read, and marked outside_root

    save(test / "good" / "000.png", noise((32, 32, 3), 70))
    (test / "empty_type").mkdir(parents=True)
    expect["parts/test/empty_type"] = "empty_class_folder"
    (test / "loop").symlink_to(test.parent)  # a class folder that is a link to its category: a loop
    d = test / "scratch"
    for i in range(8):
        save(d / f"{i:03d}.png", noise((32, 32, 3), 80 + i))
    _mask(gt / "scratch" / "000_mask.png")  # fine
    _mask(gt / "scratch" / "001_mask.png", (16, 16))  # another size
    expect["parts/ground_truth/scratch/001_mask.png"] = "mask_size_mismatch"
    (gt / "scratch" / "002_mask.png").write_bytes(b"")  # zero bytes
    expect["parts/ground_truth/scratch/002_mask.png"] = "mask_unreadable"
    (gt / "scratch" / "003_mask.png").write_text("not a mask")
    expect["parts/ground_truth/scratch/003_mask.png"] = "mask_unreadable"
    (gt / "scratch" / "004_mask.png").symlink_to(gt / "scratch" / "gone_mask.png")  # a broken link
    expect["parts/ground_truth/scratch/004_mask.png"] = "mask_unreadable"
    _mask(gt / "scratch" / "005_mask.png")
    _mask(gt / "scratch" / "005_mask.bmp")  # two masks for one image
    expect["parts/ground_truth/scratch/005_mask.png"] = expect["parts/ground_truth/scratch/005_mask.bmp"] = "ambiguous_stem"
    _mask(gt / "scratch" / "006_mask.png", value=0)  # empty: counted, not quarantined
    faint = np.zeros((32, 32, 3), np.uint8)
    faint[5:9, 5:9] = (1, 0, 0)
    save(gt / "scratch" / "007_mask.png", faint)  # faint colour: a mask
    _mask(gt / "scratch" / "099_mask.png")
    expect["parts/ground_truth/scratch/099_mask.png"] = "mask_without_image"
    _mask(gt / "scratch" / "oddname.png")
    expect["parts/ground_truth/scratch/oddname.png"] = "misnamed_mask"
    save(d / "dup_stem.png", noise((32, 32, 3), 90))
    save(d / "dup_stem.bmp", noise((32, 32, 3), 91))
    _mask(gt / "scratch" / "dup_stem_mask.png")  # would be the mask of both images
    expect["parts/ground_truth/scratch/dup_stem_mask.png"] = "ambiguous_stem"
    save(root / "stray.png", noise((8, 8), 92))
    expect["stray.png"] = "outside_layout"
    return expect


def ksdd2_corpus(root: Path) -> dict[str, str]:
    expect = {}
    tr = root / "train"
    for i, (label, value) in enumerate([(0, 0), (1, 255), (1, 1)]):
        stem = f"{10000 + i}"
        save(tr / f"{stem}.png", noise((40, 16, 3), 200 + i))
        m = np.zeros((40, 16, 3), np.uint8)
        m[10:14, 4:8, 0] = value  # 10002: a colour mask with the faint value (1, 0, 0)
        save(tr / f"{stem}_GT.png", m)
    save(tr / "99007.png", noise((40, 16, 3), 210))
    save(tr / "99007.bmp", noise((40, 16, 3), 211))
    _mask(tr / "99007_GT.png", (40, 16))
    for name in ("99007.png", "99007.bmp", "99007_GT.png"):
        expect[f"train/{name}"] = "ambiguous_stem"
    save(tr / "99008.png", noise((40, 16, 3), 212))
    _mask(tr / "99008_GT.png", (40, 16))
    _mask(tr / "99008_GT.bmp", (40, 16))
    for name in ("99008.png", "99008_GT.png", "99008_GT.bmp"):
        expect[f"train/{name}"] = "ambiguous_stem"
    save(tr / "99009.png", noise((40, 16, 3), 213))
    (tr / "99009_GT.png").symlink_to(tr / "gone_GT.png")
    expect["train/99009.png"] = expect["train/99009_GT.png"] = "mask_broken_link"
    save(tr / "99010.png", noise((40, 16, 3), 214))
    (tr / "99010_GT.png").write_bytes(b"")
    expect["train/99010.png"] = expect["train/99010_GT.png"] = "mask_empty_file"
    (tr / os.fsdecode(b"9901\xff.png")).write_bytes(b"x")
    expect[printable(Path("train") / os.fsdecode(b"9901\xff.png"))] = "undecodable_name"
    return expect


def _entries(root: Path) -> list[str]:
    """Every file and link under root, links not followed (a link to a folder is not a file)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            found.append(printable((Path(dirpath) / name).relative_to(root)))
    return sorted(found)


def _accounted(scan, root: Path, expect: dict[str, str]) -> None:
    images = set(scan.images.rel_path)
    masks = {m for m in scan.images.mask_path.dropna()}
    quarantined = dict(zip(scan.quarantine.rel_path, scan.quarantine.reason))
    for rel in _entries(root):
        is_mask = str((root / rel).resolve()) in masks if "\\x" not in rel else False
        assert (rel in images) + is_mask + (rel in quarantined) == 1, f"{rel}: not accounted for exactly once"
    for rel, reason in expect.items():
        assert quarantined.get(rel) == reason, f"{rel}: quarantined as {quarantined.get(rel)!r}, expected {reason!r}"


def test_every_file_of_a_hostile_mvtec_tree_is_an_image_a_mask_or_a_quarantine_row(tmp_path):
    from saec.artifacts.store import write_table
    from saec.tasks.sft import SFTConfig, mask_paths, split_sft, write_jsonl

    root = tmp_path / "mvtec"
    expect = mvtec_corpus(root, tmp_path / "elsewhere")
    scan = read_mvtec(root)
    _accounted(scan, root, expect)
    rows = scan.images.set_index("rel_path")
    assert rows.loc["parts/train/good/far.png", "outside_root"] and not rows.outside_root.drop("parts/train/good/far.png").any()
    assert rows.loc["parts/test/scratch/007.png", "mask_path"] is not None  # the faint mask is a mask
    counts = scan.counts()
    assert counts["defect_with_empty_mask"] == 1 and counts["defect_without_mask"] == 7
    # the tables hold everything, odd names included
    write_table(scan.images, "source_images", tmp_path / "images.parquet")
    write_table(scan.quarantine, "quarantine", tmp_path / "quarantine.parquet")
    # every stage after the scan can read what it accepted
    train, val = split_sft(scan.images, SFTConfig())
    write_jsonl(pd_concat(train, val), tmp_path / "all.jsonl", mask_paths(scan.images), {})
    _readable_by_every_stage(scan.images, tmp_path)


def test_every_file_of_a_hostile_ksdd2_tree_is_an_image_a_mask_or_a_quarantine_row(tmp_path):
    root = tmp_path / "ksdd2"
    expect = ksdd2_corpus(root)
    scan = read_ksdd2(root)
    _accounted(scan, root, expect)
    labels = dict(zip(scan.images.rel_path, scan.images.label))
    assert labels == {"train/10000.png": 0, "train/10001.png": 1, "train/10002.png": 1}  # (1, 0, 0) marks a defect


def pd_concat(*frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def _readable_by_every_stage(images, tmp_path: Path) -> None:
    """The edge's decoder, the cloud's, the complexity score and the edge trainer's image folder."""
    import cv2

    from saec.tasks.cloud.images import load_rgb
    from saec.tasks.complexity import ComplexityConfig, grey_square
    from saec.tasks.edge.preprocess import decode_bgr
    from saec.tasks.edge.train import build_imagefolder

    for path in images.path:
        assert decode_bgr(path).shape[2] == 3
        assert load_rgb(path, 32).size == (32, 32)
        assert grey_square(path, ComplexityConfig()).ndim == 2
    rows = images.assign(path=images.path)[["image_id", "path", "label"]].drop_duplicates("image_id")
    half = rows.iloc[::2].drop_duplicates("label")
    rest = rows[~rows.image_id.isin(half.image_id)]
    if set(half.label) != {0, 1} or set(rest.label) != {0, 1}:
        pytest.skip("the corpus split lacks a class")
    build_imagefolder(rest, half, tmp_path / "imagefolder", balance=False)
    for f in (tmp_path / "imagefolder").rglob("*.*"):
        assert cv2.imread(str(f)) is not None, f"OpenCV (Ultralytics' reader) cannot read {f.name}"
    assert any(f.suffix == ".png" and not f.is_symlink() for f in (tmp_path / "imagefolder").rglob("*"))  # float TIFF


@pytest.mark.slow
def test_layout_mistakes_end_the_command_in_one_line(tmp_path):
    """An empty root, a KolektorSDD2 folder given as the MVTec root and the reverse: one line, exit 1."""
    import subprocess
    import sys

    from conftest import make_ksdd2, make_mvtec

    mvtec, ksdd2, empty = make_mvtec(tmp_path / "mvtec"), make_ksdd2(tmp_path / "ksdd2"), tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "home" / ".prefect")}
    cases = [(f"data.mvtec_root={empty}", "no MVTec AD category"),
             (f"data.mvtec_root={ksdd2}", "no MVTec AD category"),
             (f"data.ksdd2_root={mvtec}", "no train/ or test/ folder")]  # fmt: skip
    for i, (root, says) in enumerate(cases):
        done = subprocess.run([sys.executable, "-m", "saec.cli", "prepare", "--set", "data.source=folders", "--set", root,
                               "--set", f"store.root={tmp_path / f'store{i}'}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)  # fmt: skip
        lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
        assert done.returncode == 1 and len(lines) == 1, lines[-30:]
        assert lines[0].startswith("error: ") and says in lines[0]
