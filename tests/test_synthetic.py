"""The synthetic datasets: exact layouts, determinism, modes, defect masks, and difficulty."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from saec.artifacts.hashing import hash_tree, tree_files
from difficulty_probe import linear_cv_accuracy, quality_probe
from saec.datasets.synthetic import (
    CATEGORIES,
    DEFAULT_CATEGORIES,
    WORLD_CATEGORIES,
    KSDD2_MODE,
    SyntheticConfig,
    generate_all,
    generate_ksdd2,
    generate_mvtec,
    render_ksdd2_sample,
    render_mvtec_sample,
    sample_rng,
)

SMALL = dict(n_train_good=2, n_test_good=2, n_test_defect_per_type=2, ksdd2_n_train=6, ksdd2_n_test=4)


@pytest.fixture(scope="module")
def default_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, SyntheticConfig]:
    """The default configuration, generated once for the module."""
    cfg = SyntheticConfig()
    root = tmp_path_factory.mktemp("synthetic_default")
    counts = generate_all(root, cfg)
    return root, counts, cfg


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ----------------------------------------------------------------------------- config


def test_the_default_draw_covers_both_modes_and_kinds_and_the_pretraining_world_shares_none_of_it() -> None:
    cfg = SyntheticConfig()
    assert {CATEGORIES[c].mode for c in cfg.categories} == {"L", "RGB"}
    assert {CATEGORIES[c].kind for c in cfg.categories} == {"texture", "object"}
    # the stand-ins' pretraining world: neither an evaluated category nor an evaluated defect kind
    assert not set(WORLD_CATEGORIES) & set(cfg.categories)
    shown = {d for c in cfg.categories for d in CATEGORIES[c].defect_types}
    assert shown and not {d for c in WORLD_CATEGORIES for d in CATEGORIES[c].defect_types} & shown
    # KSDD2 defects per split: the rate applied and rounded, never leaving a class empty
    for n, rate, expected in [(2, 0.01, 1), (10, 0.5, 5), (10, 0.99, 9), (101, 0.25, 25), (240, 0.25, 60)]:
        assert SyntheticConfig(ksdd2_n_train=n, ksdd2_defect_rate=rate).ksdd2_n_defect("train") == expected


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (dict(categories=["carpet", "wood"]), "unknown categories ['wood']"),
        (dict(categories=[]), "categories is empty"),
        (dict(categories=["grid", "grid"]), "more than once"),
        (dict(ksdd2_defect_rate=0.0), "greater than 0"),
        (dict(ksdd2_defect_rate=1.0), "less than 1"),
        (dict(ksdd2_size=(16, 320)), "ksdd2_size"),
        (dict(mvtec_size=32), "greater than or equal to 64"),
        (dict(n_test_defect_per_type=0), "greater than or equal to 1"),
        (dict(seed=-1), "greater than or equal to 0"),
        (dict(n_train=5), "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_values(bad: dict, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        SyntheticConfig(**bad)
    assert fragment in str(info.value)


def test_unknown_category_error_lists_known_ones() -> None:
    with pytest.raises(ValidationError) as info:
        SyntheticConfig(categories=["bottle"])
    for name in CATEGORIES:
        assert name in str(info.value)


def test_render_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown category 'wood'"):
        render_mvtec_sample("wood", None, sample_rng(0, "x"))
    with pytest.raises(ValueError, match="has no defect type 'hole'"):
        render_mvtec_sample("grid", "hole", sample_rng(0, "x"))


# ----------------------------------------------------------------------------- layouts


def test_mvtec_layout_is_exact(default_data: tuple[Path, dict, SyntheticConfig]) -> None:
    root, counts, cfg = default_data
    mvtec = root / "mvtec_ad"
    assert _names(mvtec) == set(cfg.categories)
    for cat in cfg.categories:
        spec = CATEGORIES[cat]
        base = mvtec / cat
        assert _names(base) == {"train", "test", "ground_truth"}
        assert _names(base / "train") == {"good"}
        assert _names(base / "test") == {"good", *spec.defect_types}
        assert _names(base / "ground_truth") == set(spec.defect_types)
        expected = {("train", "good"): cfg.n_train_good, ("test", "good"): cfg.n_test_good}
        expected |= {("test", d): cfg.n_test_defect_per_type for d in spec.defect_types}
        for (split, dtype), n in expected.items():
            assert counts["mvtec_ad"][cat][split][dtype] == n
            files = sorted((base / split / dtype).iterdir())
            assert [f.name for f in files] == [f"{i:03d}.png" for i in range(n)]
            if dtype == "good":
                continue
            masks = sorted((base / "ground_truth" / dtype).iterdir())
            assert [m.name for m in masks] == [f"{i:03d}_mask.png" for i in range(n)]
            for f, m in zip(files, masks):
                with Image.open(f) as im, Image.open(m) as mk:
                    assert im.format == "PNG" and im.mode == spec.mode
                    assert im.size == (cfg.mvtec_size, cfg.mvtec_size)
                    assert mk.mode == "L" and mk.size == im.size
                    values = np.unique(np.asarray(mk))
                assert set(values.tolist()) == {0, 255}, f"{m} must be 0/255 and non-empty"
        for f in (base / "train" / "good").iterdir():
            with Image.open(f) as im:
                assert im.mode == spec.mode and im.size == (cfg.mvtec_size, cfg.mvtec_size)


def test_ksdd2_layout_is_exact(default_data: tuple[Path, dict, SyntheticConfig]) -> None:
    root, counts, cfg = default_data
    ksdd2 = root / "ksdd2"
    assert _names(ksdd2) == {"train", "test"}
    ids: dict[str, set[str]] = {}
    for split, n in (("train", cfg.ksdd2_n_train), ("test", cfg.ksdd2_n_test)):
        names = _names(ksdd2 / split)
        images = sorted(x for x in names if not x.endswith("_GT.png"))
        assert len(images) == n and len(names) == 2 * n
        assert all(re.fullmatch(r"\d{5}\.png", x) for x in images)
        ids[split] = {x[:5] for x in images}
        n_defect = 0
        for name in images:
            img_path = ksdd2 / split / name
            mask_path = img_path.with_name(img_path.stem + "_GT.png")
            assert mask_path.is_file(), f"{mask_path} missing"
            with Image.open(img_path) as im, Image.open(mask_path) as mk:
                assert im.mode == KSDD2_MODE and im.size == cfg.ksdd2_size
                assert mk.mode == "L" and mk.size == im.size
                m = np.asarray(mk)
            assert set(np.unique(m).tolist()) <= {0, 255}
            n_defect += int(m.any())
        assert n_defect == cfg.ksdd2_n_defect(split) == counts["ksdd2"][split]["defect"]
        assert n - n_defect == counts["ksdd2"][split]["good"] > 0
    assert not ids["train"] & ids["test"], "train and test ids must differ"


# ----------------------------------------------------------------------------- determinism


def test_generation_is_byte_deterministic(tmp_path: Path) -> None:
    cfg = SyntheticConfig(mvtec_size=128, ksdd2_size=(58, 160), **SMALL)
    a = generate_all(tmp_path / "a", cfg, workers=1)
    b = generate_all(tmp_path / "b", cfg, workers=3)
    assert a == b
    files_a = [p.relative_to(tmp_path / "a") for p in tree_files(tmp_path / "a")]
    files_b = [p.relative_to(tmp_path / "b") for p in tree_files(tmp_path / "b")]
    assert files_a == files_b and len(files_a) > 50
    assert hash_tree(tmp_path / "a") == hash_tree(tmp_path / "b")
    other = SyntheticConfig(seed=cfg.seed + 1, mvtec_size=128, ksdd2_size=(58, 160), **SMALL)
    generate_all(tmp_path / "c", other)
    assert hash_tree(tmp_path / "c") != hash_tree(tmp_path / "a")


def test_an_image_does_not_depend_on_other_counts(tmp_path: Path) -> None:
    small = SyntheticConfig(categories=["capsule"], mvtec_size=96, **SMALL)
    large = SyntheticConfig(categories=["ring", "capsule"], mvtec_size=96, **{**SMALL, "n_test_good": 5})
    generate_mvtec(tmp_path / "s", small)
    generate_mvtec(tmp_path / "l", large)
    rels = ("capsule/test/good/001.png", "capsule/test/scratch/001.png", "capsule/ground_truth/scratch/001_mask.png")
    for rel in rels:
        assert (tmp_path / "s" / rel).read_bytes() == (tmp_path / "l" / rel).read_bytes()


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    cfg = SyntheticConfig(ksdd2_size=(58, 160), **SMALL)
    target = tmp_path / "ksdd2"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_ksdd2(target, cfg)
    assert (target / "stale.txt").exists()
    generate_ksdd2(target, cfg, overwrite=True)
    assert _names(target) == {"train", "test"}
    assert not list(tmp_path.glob(".*partial*")), "no staging folder may be left behind"


# ----------------------------------------------------------------------------- defects


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_defects_change_exactly_the_masked_pixels(category: str) -> None:
    spec = CATEGORIES[category]
    for i in range(3):
        good = render_mvtec_sample(category, None, sample_rng(7, category, "good", i))
        assert good.mask is None and np.array_equal(good.image, good.clean)
        assert good.image.ndim == (3 if spec.mode == "RGB" else 2)
        for dtype in spec.defect_types:
            smp = render_mvtec_sample(category, dtype, sample_rng(7, category, dtype, i))
            inside = smp.mask > 0
            diff = np.abs(smp.image.astype(np.int16) - smp.clean.astype(np.int16))
            diff = diff.max(axis=2) if diff.ndim == 3 else diff
            assert inside.sum() >= 12, f"{category}/{dtype}: defect area {inside.sum()} px"
            assert not diff[~inside].any(), f"{category}/{dtype}: pixels changed outside the mask"
            assert diff[inside].mean() >= 5.0, f"{category}/{dtype}: change inside the mask too faint"
            assert np.percentile(diff[inside], 90) >= 10.0


def test_ksdd2_defects_change_exactly_the_masked_pixels() -> None:
    for i in range(8):
        good = render_ksdd2_sample(False, sample_rng(3, "good", i))
        assert good.mask is not None and not good.mask.any() and good.mask.shape == (320, 116)
        bad = render_ksdd2_sample(True, sample_rng(3, "bad", i))
        inside = bad.mask > 0
        diff = np.abs(bad.image.astype(np.int16) - bad.clean.astype(np.int16)).max(axis=2)
        assert inside.sum() >= 6 and not diff[~inside].any() and diff[inside].mean() >= 5.0


def test_goods_vary(default_data: tuple[Path, dict, SyntheticConfig]) -> None:
    """Normal variation: no two goods are alike, and they differ by more than noise."""
    root, _, cfg = default_data
    for cat in cfg.categories:
        good = root / "mvtec_ad" / cat / "train" / "good"
        a, b = (np.asarray(Image.open(good / f"{i:03d}.png"), np.float32) for i in (0, 1))
        assert np.abs(a - b).mean() > 3.0


# ----------------------------------------------------------------------------- difficulty


def test_probe_classifier_detects_separable_features() -> None:
    """The probe itself works: on features that carry the label it reaches full accuracy."""
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    x = rng.normal(size=(80, 5))
    x[:, 2] += 6.0 * y
    assert linear_cv_accuracy(x, y, folds=5, seed=0) > 0.95
    assert linear_cv_accuracy(rng.normal(size=(80, 5)), y, folds=5, seed=0) < 0.8


def test_task_is_not_trivial_for_global_statistics(default_data: tuple[Path, dict, SyntheticConfig]) -> None:
    root, _, cfg = default_data
    scores = quality_probe(root)
    assert set(scores) == {*cfg.categories, "ksdd2"}
    for name, acc in scores.items():
        assert acc < 0.9, f"{name}: a linear model on global statistics reaches {acc:.2f}"


# ----------------------------------------------------------------------------- defect visibility

# sha256 (first 16 hex digits) of image, clean and mask bytes of one sample per type, rendered
# at the reference visibility 1.0 by the generator before the visibility knob existed
REFERENCE_DIGESTS = {
    "capsule/good": "961b7d893238fcea",
    "capsule/crack": "a509410bb0fcec63",
    "capsule/faulty_imprint": "d5939300ec992d0e",
    "capsule/misplaced": "6c571f6269a595e9",
    "capsule/scratch": "b11ee5a6c8e6ba82",
    "carpet/good": "23a9759c59d866b4",
    "carpet/color": "93ef2bcea3b0d238",
    "carpet/cut": "1a7743546aa81929",
    "carpet/hole": "4946639fce450eb4",
    "carpet/thread": "a9d45bf3b8ededd0",
    "grid/good": "f45865bd5590cf13",
    "grid/bent": "879281a6dd8dbc63",
    "grid/broken": "a9bd3f7fa91aa8b5",
    "grid/glue": "d072e433a38c08cb",
    "grid/metal_contamination": "32747bbf4cf8a53f",
    "ring/good": "0c75cc801b66be5c",
    "ring/chip": "d2ab6e8f643d057e",
    "ring/contamination": "9f02c54d687a5bb4",
    "ring/crack": "4837bec9af2edbd1",
    "ring/scratch": "5bbe523dc1e663f1",
    "ksdd2/0/0": "aded2fecbb2db0c6",
    "ksdd2/0/1": "066bdf1ef8bd0672",
    "ksdd2/1/0": "6d3351b7aaafb429",
    "ksdd2/1/1": "1ffe971ac4eacfc2",
}
# hash_tree of generate_all(SyntheticConfig(mvtec_size=128, ksdd2_size=(58, 160), **SMALL)), same origin.
# The files differ by a few pixels between CPU families (with the same OpenCV and NumPy): one hash
# was seen on Intel Xeon machines with AVX-512, the other on an AMD EPYC machine with AVX2 only.
REFERENCE_SMALL_TREES = {
    "48414e0847e704f85f3a96bf1b042184134934db860e1e7efe918d7aa0b04ea6",  # Intel Xeon, AVX-512
    "7f5035d77d3e1ebb1c8a0b17d86ae14e334af2ddd907537fe4a48550a8fa2116",  # AMD EPYC, AVX2
}


def _digest(smp) -> str:
    h = hashlib.sha256()
    h.update(smp.image.tobytes())
    h.update(smp.clean.tobytes())
    if smp.mask is not None:
        h.update(smp.mask.tobytes())
    return h.hexdigest()[:16]


def _change(smp) -> np.ndarray:
    diff = np.abs(smp.image.astype(np.int16) - smp.clean.astype(np.int16))
    return diff.max(axis=2) if diff.ndim == 3 else diff


def test_reference_visibility_reproduces_earlier_output_bit_for_bit(tmp_path: Path) -> None:
    got = {}
    for cat in sorted(DEFAULT_CATEGORIES):  # the pretraining world's categories are not pinned
        for dtype in ("good", *CATEGORIES[cat].defect_types):
            rng = sample_rng(2025, "digest", cat, dtype, 0)
            got[f"{cat}/{dtype}"] = _digest(render_mvtec_sample(cat, dtype, rng, 256, visibility=1.0))
    for defective in (0, 1):
        for i in range(2):
            rng = sample_rng(2025, "digest", "ksdd2", defective, i)
            got[f"ksdd2/{defective}/{i}"] = _digest(render_ksdd2_sample(bool(defective), rng, visibility=1.0))
    assert got == REFERENCE_DIGESTS
    cfg = SyntheticConfig(mvtec_size=128, ksdd2_size=(58, 160), **SMALL)
    assert cfg.defect_visibility == 1.0
    generate_all(tmp_path / "ref", cfg)
    assert hash_tree(tmp_path / "ref") in REFERENCE_SMALL_TREES


def test_visibility_is_validated() -> None:
    for bad, fragment in ((0.1, "greater than or equal to 0.25"), (9.0, "less than or equal to 8")):
        with pytest.raises(ValidationError, match=fragment):
            SyntheticConfig(defect_visibility=bad)
    with pytest.raises(ValueError, match="0.25..8.0"):
        render_mvtec_sample("grid", "glue", sample_rng(0, "x"), 128, visibility=8.5)


VISIBILITY_TYPES = [(c, d) for c in sorted(CATEGORIES) for d in CATEGORIES[c].defect_types] + [("ksdd2", "defect")]


def _render(cat: str, dtype: str, i: int, visibility: float):
    rng = sample_rng(11, cat, dtype, i)
    if cat == "ksdd2":
        return render_ksdd2_sample(True, rng, visibility=visibility)
    return render_mvtec_sample(cat, dtype, rng, 256, visibility=visibility)


@pytest.mark.parametrize("cat, dtype", VISIBILITY_TYPES, ids=[f"{c}-{d}" for c, d in VISIBILITY_TYPES])
def test_higher_visibility_gives_larger_and_stronger_defects(cat: str, dtype: str) -> None:
    """Same seeds at 1.0 and 2.5: the masks grow and the change inside them grows, type by type."""
    area = {1.0: [], 2.5: []}
    change = {1.0: [], 2.5: []}
    for v in area:
        for i in range(4):
            smp = _render(cat, dtype, i, v)
            inside = smp.mask > 0
            diff = _change(smp)
            assert not diff[~inside].any(), f"{cat}/{dtype} at {v}: pixels changed outside the mask"
            area[v].append(int(inside.sum()))
            change[v].append(float(diff[inside].mean()))
    assert np.mean(area[2.5]) > 1.05 * np.mean(area[1.0]), f"{cat}/{dtype}: areas {area}"
    assert np.mean(change[2.5]) > np.mean(change[1.0]), f"{cat}/{dtype}: mean changes {change}"


def test_visibility_does_not_touch_goods_and_is_deterministic(tmp_path: Path) -> None:
    for cat in sorted(CATEGORIES):
        a = render_mvtec_sample(cat, None, sample_rng(4, cat), 128, visibility=1.0)
        b = render_mvtec_sample(cat, None, sample_rng(4, cat), 128, visibility=3.0)
        assert np.array_equal(a.image, b.image)
    cfg = SyntheticConfig(mvtec_size=128, ksdd2_size=(58, 160), defect_visibility=2.5, **SMALL)
    generate_all(tmp_path / "a", cfg, workers=1)
    generate_all(tmp_path / "b", cfg, workers=3)
    assert hash_tree(tmp_path / "a") == hash_tree(tmp_path / "b")
    assert hash_tree(tmp_path / "a") not in REFERENCE_SMALL_TREES
    # the goods are the same files as at the reference visibility; only defect images and masks differ
    generate_all(tmp_path / "ref", SyntheticConfig(mvtec_size=128, ksdd2_size=(58, 160), **SMALL))
    for rel in ("mvtec_ad/ring/train/good/000.png", "mvtec_ad/carpet/test/good/001.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes()
    rel = "mvtec_ad/capsule/test/crack/000.png"
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "ref" / rel).read_bytes()


def test_higher_visibility_survives_downscaling() -> None:
    """What a 112 px model sees: thin defects cover more changed pixels after an area downscale."""
    for cat, dtype in (("capsule", "crack"), ("ring", "scratch"), ("ring", "crack"), ("capsule", "scratch")):
        counts = {}
        for v in (1.0, 2.5):
            n = 0
            for i in range(3):
                smp = _render(cat, dtype, i, v)
                small = [cv2.resize(x, (112, 112), interpolation=cv2.INTER_AREA).astype(np.int16)
                         for x in (smp.image, smp.clean)]
                diff = np.abs(small[0] - small[1])
                n += int(((diff.max(axis=2) if diff.ndim == 3 else diff) >= 20).sum())
            counts[v] = n
        assert counts[2.5] > 2 * counts[1.0], f"{cat}/{dtype}: changed 112 px pixels {counts}"


def test_the_pretraining_world_shares_no_category_or_defect_kind_with_the_evaluation() -> None:
    """Stand-ins pretrained on the world draw meet the embedded categories and defects only when
    evaluated: what they score there is transfer, not memory."""
    from saec.datasets.synthetic import WORLD_CATEGORIES

    shown = {d for c in DEFAULT_CATEGORIES for d in CATEGORIES[c].defect_types}
    world = {d for c in WORLD_CATEGORIES for d in CATEGORIES[c].defect_types}
    assert set(WORLD_CATEGORIES).isdisjoint(DEFAULT_CATEGORIES) and world.isdisjoint(shown)
    assert {CATEGORIES[c].kind for c in WORLD_CATEGORIES} == {"texture", "object"}
    assert {CATEGORIES[c].mode for c in WORLD_CATEGORIES} == {"L", "RGB"}
    cfg = SyntheticConfig(categories=list(WORLD_CATEGORIES))  # a world draw is an ordinary configuration
    assert cfg.categories == list(WORLD_CATEGORIES)
