"""Holdout, KolektorSDD2 1:1 and SFT rules, and the leakage check, on real files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saec.artifacts.hashing import sha256_file
from saec.datasets.ksdd2 import read_ksdd2
from saec.datasets.mvtec import read_mvtec
from saec.prompts import INSTRUCTION
from saec.tasks.data import (
    HoldoutConfig,
    KSDD2Config,
    LeakageError,
    build_holdout,
    build_ksdd2_balanced,
    check_disjoint,
)
from saec.tasks.sft import SFTConfig, mask_paths, read_jsonl, split_sft, write_jsonl


@pytest.fixture
def scan(mvtec_tree):
    return read_mvtec(mvtec_tree).images


def test_sft_split_follows_the_seed_rules(scan):
    train, val = split_sft(scan, SFTConfig(defect_train_ratio=0.5, seed=42))
    for cat, rows in scan.groupby("category"):
        tr, va = train[train.category == cat], val[val.category == cat]
        n_def = int(((rows.split == "test") & (rows.label == 1)).sum())
        assert (tr.label == 0).sum() == ((rows.split == "train")).sum()  # every train/good image trains
        assert (tr.label == 1).sum() == n_def // 2
        assert (va.label == 0).sum() == ((rows.split == "test") & (rows.label == 0)).sum()
        assert (va.label == 1).sum() == n_def - n_def // 2
    assert set(train.image_id).isdisjoint(val.image_id)
    assert len(train) + len(val) == len(scan)
    again, _ = split_sft(scan, SFTConfig(seed=42))
    other, _ = split_sft(scan, SFTConfig(seed=7))
    assert list(again.image_id) == list(train.image_id)
    assert set(other[other.label == 1].image_id) != set(train[train.label == 1].image_id)
    none, _ = split_sft(scan, SFTConfig(defect_train_ratio=0.0))
    assert (none.label == 0).all()


def test_sft_jsonl_is_chat_form(scan, tmp_path):
    train, _ = split_sft(scan, SFTConfig())
    path = write_jsonl(train, tmp_path / "train.jsonl")
    rows = read_jsonl(path)
    assert len(rows) == len(train)
    for rec, label in zip(rows, train.label):
        user, assistant = rec["messages"]
        assert user["role"] == "user" and user["content"][0] == {"type": "image", "image": rec["image"]}
        assert user["content"][1]["text"] == INSTRUCTION
        assert assistant == {"role": "assistant", "content": [{"type": "text", "text": f"Label: {label}"}]}
        assert rec["label"] == label and sha256_file(rec["image"]) == rec["image_id"]
    assert json.loads(path.read_text().splitlines()[0])["image_id"] == train.image_id.iloc[0]


def test_holdout_draws_from_test_only_and_excludes_sft_train(scan, tmp_path):
    train, _ = split_sft(scan, SFTConfig())
    ids = set(train.image_id)
    manifest, info = build_holdout(scan, ids, HoldoutConfig(n_good=4, n_defect=3, seed=2025), tmp_path / "h")
    assert info["actual"] == {"good": 4, "defect": 3}
    assert info["excluded_sft_train"] == int((train.label == 1).sum())
    assert set(manifest.image_id).isdisjoint(ids)
    src = scan.set_index("image_id")
    assert (src.loc[manifest.image_id, "split"] == "test").all()
    for row in manifest.itertuples():
        p = Path(row.path)
        assert p.is_symlink() and p.parent.name == ("defect" if row.label else "good")
        assert sha256_file(p) == row.image_id
        expected = f"{row.category}__{Path(row.source_path).name}" if row.label == 0 else (
            f"{row.category}__{row.defect_type}__{Path(row.source_path).name}"
        )
        assert p.name == expected
    # asking for more than there is: as_available takes everything, and the shortfall is said out loud
    goods = int(((scan.split == "test") & (scan.label == 0)).sum())
    defects = int(((scan.split == "test") & (scan.label == 1) & ~scan.image_id.isin(ids)).sum())
    assert goods != defects  # the two classes run short by different amounts: the modes differ
    big, info = build_holdout(scan, ids, HoldoutConfig(n_good=500, n_defect=500, link="copy", balance="as_available"),
                              tmp_path / "big")
    assert info["actual"] == {"good": goods, "defect": defects} == info["available"]
    assert "shortfall" in info and "as_available took" in info["shortfall"]
    assert not any(Path(p).is_symlink() for p in big.path)
    # the default keeps the asked 1:1 by cutting both classes to the smaller
    capped, info = build_holdout(scan, ids, HoldoutConfig(n_good=500, n_defect=500), tmp_path / "capped")
    assert info["actual"] == {"good": min(goods, defects), "defect": min(goods, defects)}
    assert info["balance"] == "cap_to_smaller" and "cap_to_smaller took" in info["shortfall"]
    assert set(capped.image_id) <= set(big.image_id)
    # a test split without goods cannot give a holdout: one line that says why and what to do
    from saec.tasks.data import HoldoutError

    no_goods = scan[~((scan.split == "test") & (scan.label == 0))]
    with pytest.raises(HoldoutError, match="hold no good images: the holdout needs both classes"):
        build_holdout(no_goods, ids, HoldoutConfig(), tmp_path / "none")
    # same seed, same holdout
    again, _ = build_holdout(scan, ids, HoldoutConfig(n_good=4, n_defect=3, seed=2025), tmp_path / "h2")
    assert list(again.image_id) == list(manifest.image_id)


def test_leakage_check_fails_on_injected_overlap(scan, tmp_path):
    train, _ = split_sft(scan, SFTConfig())
    manifest, _ = build_holdout(scan, set(train.image_id), HoldoutConfig(n_good=2, n_defect=2), tmp_path / "h")
    check_disjoint(manifest, set(train.image_id), "holdout")  # clean: no error
    leaked = pd.concat([manifest, train.iloc[:1]])
    with pytest.raises(LeakageError, match="1 holdout image.*SFT train split"):
        check_disjoint(leaked, set(train.image_id), "holdout")


def test_ksdd2_balanced_keeps_every_defect_and_as_many_goods(ksdd2_tree, tmp_path):
    images = read_ksdd2(ksdd2_tree).images
    manifest, info = build_ksdd2_balanced(images, KSDD2Config(seed=1234), tmp_path / "k")
    n_def = int(images.label.sum())
    assert info == {"defect": n_def, "good": n_def, "good_available": len(images) - n_def, "seed": 1234}
    assert set(manifest[manifest.label == 1].image_id) == set(images[images.label == 1].image_id)
    good_list = (tmp_path / "k" / "ksdd2_1to1_good.txt").read_text().split()
    defect_list = (tmp_path / "k" / "ksdd2_1to1_defect.txt").read_text().split()
    assert len(good_list) == len(defect_list) == n_def
    assert sorted(os.listdir(tmp_path / "k" / "val" / "defect")) == sorted(defect_list)
    again, _ = build_ksdd2_balanced(images, KSDD2Config(seed=1234), tmp_path / "k2")
    assert list(again.image_id) == list(manifest.image_id)


def test_defect_examples_carry_the_boxes_of_their_masks(mvtec_tree, tmp_path):
    from conftest import save

    gt = mvtec_tree / "alpha" / "ground_truth"
    two = np.zeros((32, 32), np.uint8)
    two[2:6, 3:10] = 255  # two separate regions, listed top to bottom
    two[20:30, 12:15] = 255
    two[0, 31] = 255  # a one-pixel speck beside larger regions is left out
    save(gt / "scratch" / "000_mask.png", two)
    (gt / "scratch" / "001_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # unreadable
    save(gt / "hole" / "000_mask.png", np.full((16, 16), 255, np.uint8))  # another size than its image
    save(gt / "hole" / "001_mask.png", np.zeros((32, 32), np.uint8))  # empty
    result = read_mvtec(mvtec_tree)
    scan = result.images
    # the scan quarantines the masks no stage can use, and counts the defects whose mask is empty
    assert sorted(zip(result.quarantine.reason, result.quarantine.rel_path)) == [
        ("mask_size_mismatch", "alpha/ground_truth/hole/000_mask.png"),
        ("mask_unreadable", "alpha/ground_truth/scratch/001_mask.png")]
    assert result.counts()["defect_with_empty_mask"] == 1
    every = scan.assign(split="sft_train", source_path=scan.path)
    counts: dict[str, int] = {}
    rows = read_jsonl(write_jsonl(every, tmp_path / "all.jsonl", mask_paths(scan), counts))
    by_name = {(Path(r["image"]).parent.name, Path(r["image"]).parent.parent.parent.name, Path(r["image"]).name): r
               for r in rows}
    assert by_name["scratch", "alpha", "000.png"]["explain"] == {
        "bboxes": [[3, 2, 10, 6], [12, 20, 15, 30]], "desc": "scratch", "width": 32, "height": 32}
    assert by_name["scratch", "beta", "000.png"]["explain"]["bboxes"] == [[4, 4, 9, 9]]  # conftest's 5x5 square
    for key in (("scratch", "alpha", "001.png"), ("hole", "alpha", "000.png"), ("hole", "alpha", "001.png")):
        assert "explain" not in by_name[key]
    assert not any("explain" in r for r in rows if r["label"] == 0)
    n_defects = sum(r["label"] for r in rows)
    assert counts == {"ok": n_defects - 3, "no_mask": 2, "empty_mask": 1}
    # the training reader accepts what the SFT stage writes, and refuses a target on a good image
    from saec.tasks.cloud.sft_examples import SFTDataError, read_sft

    assert sum(r.explain is not None for r in read_sft(tmp_path / "all.jsonl")) == n_defects - 3
    good = next(r for r in rows if r["label"] == 0)
    (tmp_path / "bad.jsonl").write_text(json.dumps(good | {"explain": by_name["scratch", "beta", "000.png"]["explain"]}))
    with pytest.raises(SFTDataError, match="good example"):
        read_sft(tmp_path / "bad.jsonl")
    outside = by_name["scratch", "beta", "000.png"] | {
        "explain": {"bboxes": [[4, 4, 40, 9]], "desc": "scratch", "width": 32, "height": 32}}
    (tmp_path / "out.jsonl").write_text(json.dumps(outside))
    with pytest.raises(SFTDataError, match="outside"):
        read_sft(tmp_path / "out.jsonl")
