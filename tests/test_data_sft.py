"""Holdout, KolektorSDD2 1:1 and SFT rules, and the leakage check, on real files."""
from __future__ import annotations

import json
import os
from pathlib import Path

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
from saec.tasks.sft import SFTConfig, read_jsonl, split_sft, write_jsonl


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
    # asking for more than there is: everything available, and the shortfall said out loud
    big, info = build_holdout(scan, ids, HoldoutConfig(n_good=500, n_defect=500, link="copy"), tmp_path / "big")
    assert info["actual"]["good"] == int(((scan.split == "test") & (scan.label == 0)).sum())
    assert "shortfall" in info and not any(Path(p).is_symlink() for p in big.path)
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
