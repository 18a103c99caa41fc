"""Image reading and the MVTec AD / KolektorSDD2 readers, on real files with every kind of bad input."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_ksdd2, make_mvtec, noise, save
from saec.datasets.images import BadImage, load_image, probe_image
from saec.datasets.ksdd2 import read_ksdd2
from saec.datasets.mvtec import read_mvtec
from saec.datasets.scan import LayoutError


# ----------------------------------------------------------------------------- single files


def test_zero_byte_truncated_and_non_image_are_refused(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = save(tmp_path / "ok.png", noise((64, 64, 3)))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    assert probe_image(good).width == 64
    for path, reason in ((empty, "empty_file"), (truncated, "truncated_or_corrupt"), (text, "not_an_image")):
        with pytest.raises(BadImage) as info:
            probe_image(path)
        assert info.value.reason == reason
        assert str(path) in str(info.value)


def test_oversized_image_is_refused_before_decoding(tmp_path):
    big = save(tmp_path / "big.png", np.zeros((1200, 1000), np.uint8))
    with pytest.raises(BadImage) as info:
        probe_image(big, max_pixels=1_000_000)
    assert info.value.reason == "too_large" and "1000x1200" in info.value.detail
    assert probe_image(big, max_pixels=2_000_000).height == 1200


def test_odd_modes_decode_to_8bit(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128  # half transparent red over black -> about 100
    p_rgba = save(tmp_path / "rgba.png", rgba, "RGBA")
    p16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(p16)
    pal = Image.fromarray(noise((8, 8, 3))).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    p_pal = tmp_path / "pal.png"
    pal.save(p_pal)

    assert probe_image(p_rgba).mode == "RGBA"
    out = np.asarray(load_image(p_rgba, "RGB"))
    assert out.shape == (8, 8, 3) and abs(int(out[0, 0, 0]) - 100) <= 1 and out[0, 0, 1] == 0
    assert probe_image(p16).mode.startswith("I;16")
    assert np.asarray(load_image(p16, "L"))[0, 0] == 40000 >> 8
    assert np.array_equal(np.asarray(load_image(p_pal, "RGB")), np.asarray(pal.convert("RGB")))


# ----------------------------------------------------------------------------- MVTec AD


def test_mvtec_reader_reads_every_image_with_its_label(mvtec_tree):
    scan = read_mvtec(mvtec_tree)
    imgs = scan.images
    assert len(imgs) == 2 * (4 + 3 + 2 * 2) and len(scan.quarantine) == 0
    assert set(imgs.category) == {"alpha", "beta"}
    assert (imgs[imgs.split == "train"].label == 0).all()
    defects = imgs[imgs.label == 1]
    assert set(defects.defect_type) == {"scratch", "hole"} and defects.mask_path.notna().all()
    assert set(imgs[imgs.category == "alpha"]["mode"]) == {"RGB"} and set(imgs[imgs.category == "beta"]["mode"]) == {"L"}
    row = imgs.iloc[0]
    assert Path(row.path).is_absolute() and len(row.image_id) == 64


def test_mvtec_bad_inputs_are_quarantined_with_reasons(mvtec_tree):
    d = mvtec_tree / "alpha" / "test" / "scratch"
    (d / "009.png").write_bytes(b"")
    (d / "010.png").write_bytes((d / "000.png").read_bytes()[:100])
    (d / "011.png").write_text("<html>not an image</html>")
    (d / "notes.txt").write_text("operator notes")
    shutil.copy(d / "001.png", d / "012.png")  # same bytes twice
    (mvtec_tree / "alpha" / "test" / "crack").mkdir()  # empty class folder
    save(mvtec_tree / "alpha" / "ground_truth" / "hole" / "077_mask.png", np.zeros((32, 32), np.uint8))
    (mvtec_tree / "beta" / "ground_truth" / "hole" / "001_mask.png").unlink()  # image without mask
    save(mvtec_tree / "alpha" / "test" / "stain" / "000.png", noise((16, 16, 4), 99), "RGBA")
    Image.fromarray(np.full((20, 30), 1234, np.uint16)).save(mvtec_tree / "beta" / "test" / "hole" / "005.png")

    scan = read_mvtec(mvtec_tree)
    reasons = dict(zip(scan.quarantine.rel_path, scan.quarantine.reason))
    assert reasons == {
        "alpha/test/scratch/009.png": "empty_file",
        "alpha/test/scratch/010.png": "truncated_or_corrupt",
        "alpha/test/scratch/011.png": "not_an_image",
        "alpha/test/scratch/notes.txt": "not_an_image_name",
        "alpha/test/scratch/012.png": "duplicate",
        "alpha/test/crack": "empty_class_folder",
        "alpha/ground_truth/hole/077_mask.png": "mask_without_image",
    }
    imgs = scan.images.set_index("rel_path")
    assert imgs.loc["alpha/test/stain/000.png", "mode"] == "RGBA"  # odd modes are read, not dropped
    assert imgs.loc["beta/test/hole/005.png", "mode"].startswith("I;16")
    assert pd_isna(imgs.loc["beta/test/hole/001.png", "mask_path"])
    counts = scan.counts()
    assert counts["defect_without_mask"] == 3 and counts["quarantined"] == 7
    # nothing silently dropped: every file under the tree is either an image row or a quarantine row
    files = {p.relative_to(mvtec_tree).as_posix() for p in mvtec_tree.rglob("*") if p.is_file() and "ground_truth" not in p.parts}
    assert files == set(imgs.index) | {r for r in reasons if "ground_truth" not in r and r != "alpha/test/crack"}


def pd_isna(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: (r / "alpha" / "train").rename(r / "alpha" / "Train"), "should be named 'train'"),
        (lambda r: (r / "alpha" / "train" / "good").rename(r / "alpha" / "train" / "ok"), "must hold a good/ folder"),
        (lambda r: shutil.rmtree(r / "beta" / "test"), "has no test/ folder"),
        (lambda r: (r / "alpha" / "test" / "good").rename(r / "alpha" / "test" / "normal"), "has no good/ folder"),
    ],
)
def test_mvtec_layout_errors_name_the_folder_and_the_fix(mvtec_tree, breakage, message):
    breakage(mvtec_tree)
    with pytest.raises(LayoutError, match=message):
        read_mvtec(mvtec_tree)


def test_mvtec_missing_root_and_no_categories(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        read_mvtec(tmp_path / "nope")
    (tmp_path / "empty" / "misc").mkdir(parents=True)
    with pytest.raises(LayoutError, match="no MVTec AD category.*found: misc"):
        read_mvtec(tmp_path / "empty")


# ----------------------------------------------------------------------------- KolektorSDD2


def test_ksdd2_masks_decide_labels_and_orphans_are_quarantined(ksdd2_tree):
    scan = read_ksdd2(ksdd2_tree)
    assert len(scan.images) == 10 and len(scan.quarantine) == 0
    assert int(scan.images.label.sum()) == 2 + 2  # every third image of each split has a defect mask
    assert set(scan.images.split) == {"train", "test"}

    stems = sorted(p.stem for p in (ksdd2_tree / "train").glob("*.png") if not p.stem.endswith("_GT"))
    (ksdd2_tree / "train" / f"{stems[0]}_GT.png").unlink()  # image without mask
    (ksdd2_tree / "train" / f"{stems[1]}.png").unlink()  # mask without image
    save(ksdd2_tree / "train" / f"{stems[2]}_GT.png", np.zeros((10, 10), np.uint8))  # wrong size
    (ksdd2_tree / "train" / f"{stems[3]}.png").write_bytes(b"")  # image unreadable, mask fine
    (ksdd2_tree / "test" / "notes.txt").write_text("x")
    scan = read_ksdd2(ksdd2_tree)
    reasons = sorted(scan.quarantine.reason)
    assert reasons == ["empty_file", "image_quarantined", "image_without_mask", "mask_size_mismatch",
                       "mask_size_mismatch", "mask_without_image", "not_an_image_name"]  # fmt: skip
    kinds = scan.quarantine.groupby("reason").kind.apply(sorted).to_dict()  # a bad pair quarantines its mask too
    assert kinds["mask_size_mismatch"] == ["image", "mask"] and kinds["image_quarantined"] == ["mask"]
    assert len(scan.images) == 6


def test_ksdd2_layout_errors(tmp_path):
    root = make_ksdd2(tmp_path / "k")
    (root / "train").rename(root / "TRAIN")
    with pytest.raises(LayoutError, match="should be named 'train'"):
        read_ksdd2(root)
    (tmp_path / "blank").mkdir()
    with pytest.raises(LayoutError, match="no train/ or test/"):
        read_ksdd2(tmp_path / "blank")


# ----------------------------------------------------------------------------- third-party images

def _third_party_images() -> list[Path]:
    """Image files shipped by installed packages (photographs and textures none of this project made)."""
    skimage = pytest.importorskip("skimage")
    data = Path(skimage.__file__).parent / "data"
    names = ["brick.png", "grass.png", "gravel.png", "camera.png", "coins.png", "text.png", "moon.png",
             "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "chelsea.png", "coffee.png", "page.png", "horse.png"]  # fmt: skip
    files = [data / n for n in names if (data / n).exists()]
    if len(files) < 10:
        pytest.skip("scikit-image sample images not found")
    return files


def test_readers_read_unmodified_third_party_files_in_both_layouts(tmp_path):
    files = _third_party_images()
    root = tmp_path / "mvtec"
    layout = {
        "textures": {"train/good": files[0:2], "test/good": files[2:3], "test/rough": files[3:5]},
        "objects": {"train/good": files[5:7], "test/good": files[7:8], "test/spot": files[8:10], "test/bent": files[10:12]},
    }
    for cat, parts in layout.items():
        for sub, srcs in parts.items():
            (root / cat / sub).mkdir(parents=True)
            for src in srcs:
                shutil.copy2(src, root / cat / sub / src.name)  # bytes unmodified
    (root / "objects" / "ground_truth" / "spot").mkdir(parents=True)  # "bent" and "rough" have no masks at all
    scan = read_mvtec(root)
    assert len(scan.images) == 12 and len(scan.quarantine) == 0
    assert {"JPEG", "PNG"} <= set(scan.images.format)
    assert {"L", "RGB"} <= set(scan.images["mode"])
    assert scan.images.width.nunique() > 3  # odd sizes kept as they are
    assert scan.counts()["defect_without_mask"] == 6
    by_name = scan.images.set_index(scan.images.path.map(lambda p: Path(p).name))
    for src in files[:12]:
        from saec.artifacts.hashing import sha256_file

        assert by_name.loc[src.name, "image_id"] == sha256_file(src)

    kroot = tmp_path / "ksdd2"
    (kroot / "train").mkdir(parents=True)
    for i, src in enumerate(files[:6]):
        stem = f"{20000 + i:05d}"
        img = Image.open(src)
        (kroot / "train" / f"{stem}{src.suffix}").write_bytes(src.read_bytes())
        mask = np.zeros((img.height, img.width), np.uint8)
        if i % 2:
            mask[: img.height // 4, : img.width // 4] = 255
        save(kroot / "train" / f"{stem}_GT.png", mask)
    kscan = read_ksdd2(kroot)
    assert len(kscan.images) == 6 and int(kscan.images.label.sum()) == 3


# ----------------------------------------------------------------------------- links: scan cache key and outside_root


def _fp(root: Path) -> str:
    from saec.tasks.data import fingerprint

    return fingerprint(root, "mvtec_ad").sha256


def _linked_category(tmp_path: Path) -> tuple[Path, Path]:
    """An MVTec AD tree under tmp/data whose category alpha/ is a link to tmp/elsewhere/alpha."""
    root = make_mvtec(tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    (root / "alpha").rename(tmp_path / "elsewhere" / "alpha")
    (root / "alpha").symlink_to(tmp_path / "elsewhere" / "alpha", target_is_directory=True)
    return root, tmp_path / "elsewhere"


def test_fingerprint_sees_changes_inside_a_symlinked_category(tmp_path):
    from saec.tasks.data import fingerprint

    root, elsewhere = _linked_category(tmp_path)
    before = fingerprint(root, "mvtec_ad")
    assert before.files == 2 * (4 + 3 + 2 * 2 + 2 * 2)  # images and masks of both categories
    assert len(read_mvtec(root).images) == 2 * (4 + 3 + 2 * 2)  # the reader reads the linked category too
    save(elsewhere / "alpha" / "test" / "good" / "000.png", noise((32, 32, 3), 777))
    assert _fp(root) != before.sha256
    before = _fp(root)
    save(elsewhere / "alpha" / "test" / "good" / "100.png", noise((32, 32, 3), 778))  # a new file in the target
    assert _fp(root) != before


def test_fingerprint_changes_when_a_broken_mask_link_is_created_fixed_or_removed(mvtec_tree):
    mask = mvtec_tree / "alpha" / "ground_truth" / "scratch" / "005_mask.png"
    plain = _fp(mvtec_tree)
    mask.symlink_to(mvtec_tree / "gone" / "005_mask.png")
    broken = _fp(mvtec_tree)
    assert broken != plain
    mask.unlink()
    assert _fp(mvtec_tree) == plain  # removing it gives the plain tree's key back
    mask.symlink_to(mvtec_tree / "alpha" / "ground_truth" / "scratch" / "000_mask.png")  # a link that works
    assert _fp(mvtec_tree) not in (plain, broken)


def test_fingerprint_of_a_tree_with_link_loops_finishes(mvtec_tree):
    from concurrent.futures import ThreadPoolExecutor

    from saec.tasks.data import fingerprint

    plain = fingerprint(mvtec_tree, "mvtec_ad")
    (mvtec_tree / "alpha" / "test" / "good" / "back").symlink_to("..", target_is_directory=True)  # -> alpha/test
    (mvtec_tree / "beta" / "ground_truth" / "top").symlink_to("../..", target_is_directory=True)  # -> the root
    with ThreadPoolExecutor(1) as pool:
        looped = pool.submit(fingerprint, mvtec_tree, "mvtec_ad").result(timeout=60)
    assert looped.files == plain.files  # nothing entered twice
    assert looped.sha256 != plain.sha256  # but the loops are part of the key
    (mvtec_tree / "beta" / "ground_truth" / "top").unlink()
    (mvtec_tree / "alpha" / "test" / "good" / "back").unlink()
    assert _fp(mvtec_tree) == plain.sha256


def test_plain_tree_fingerprint_is_hash_tree_and_odd_names_hash(mvtec_tree):
    from saec.artifacts.hashing import hash_tree, tree_files
    from saec.tasks.data import fingerprint

    (mvtec_tree / ".hidden").write_text("x")
    ref = fingerprint(mvtec_tree, "mvtec_ad")
    root = mvtec_tree.resolve()
    assert ref.sha256 == hash_tree(root) and ref.files == len(tree_files(root))
    odd = os.fsencode(mvtec_tree / "alpha" / "test") + b"/caf\xe9.txt"  # Latin-1, not UTF-8
    with open(odd, "wb") as fh:
        fh.write(b"notes")
    assert fingerprint(mvtec_tree, "mvtec_ad").sha256 != ref.sha256


def test_scan_marks_images_reached_through_a_link_outside_the_root(tmp_path):
    from saec.artifacts.schemas import conform

    root, elsewhere = _linked_category(tmp_path)
    (root / "beta" / "test" / "good" / "009.png").symlink_to(root / "beta" / "train" / "good" / "000.png")
    scan = read_mvtec(root)
    imgs = scan.images
    assert len(imgs) == 2 * (4 + 3 + 2 * 2)  # the in-root link repeats bytes: quarantined as a duplicate
    assert imgs[imgs.category == "alpha"].outside_root.all() and len(imgs[imgs.category == "alpha"]) == 11
    assert not imgs[imgs.category == "beta"].outside_root.any()
    assert conform(imgs, "source_images").schema.field("outside_root").type == "bool"

    kroot = make_ksdd2(tmp_path / "ksdd2")
    (kroot / "test").rename(tmp_path / "ksdd2_test")
    (kroot / "test").symlink_to(tmp_path / "ksdd2_test", target_is_directory=True)
    kimgs = read_ksdd2(kroot).images
    assert (kimgs.outside_root == (kimgs.split == "test")).all() and kimgs.outside_root.any()
