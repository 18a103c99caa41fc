"""Supervised edge: the ImageFolder built from SFT JSONL, training through Ultralytics, and inference."""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from saec.artifacts.schemas import SCHEMAS
from saec.artifacts.store import read_table
from saec.tasks.edge.config import EdgeConfig
from saec.tasks.edge.model import load_classifier, model_id_of
from saec.tasks.edge.predict import predict_edge
from saec.tasks.edge.train import build_imagefolder, read_sft_jsonl, train_edge


def _write_set(root: Path, n_good: int, n_defect: int, seed: int) -> list[dict]:
    """Grey textures; a defect is a bright disc. Returns SFT records."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_good + n_defect):
        label = int(i >= n_good)
        img = rng.normal(100, 12, (48, 48)).clip(0, 255)
        if label:
            cy, cx = rng.integers(10, 38, 2)
            yy, xx = np.mgrid[:48, :48]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = 240
        path = root / f"{seed}-{i:03d}.png"
        Image.fromarray(img.astype(np.uint8)).convert("RGB").save(path)
        image_id = hashlib.sha256(path.read_bytes()).hexdigest()
        records.append({"image_id": image_id, "image": str(path), "label": label, "category": "toy",
                        "defect_type": "disc" if label else "good", "messages": []})
    return records


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    (root / "img").mkdir()
    return {
        "train": _jsonl(root / "sft_train.jsonl", _write_set(root / "img", 16, 8, seed=1)),
        "val": _jsonl(root / "sft_val.jsonl", _write_set(root / "img", 6, 6, seed=2)),
        "holdout": _jsonl(root / "holdout.jsonl", _write_set(root / "img", 6, 6, seed=3)),
    }


def test_imagefolder_layout_and_balancing(sft, tmp_path):
    train, val = read_sft_jsonl(sft["train"]), read_sft_jsonl(sft["val"])
    counts = build_imagefolder(train, val, tmp_path / "if")
    assert counts["train"] == {"good": 16, "defect": 8, "good_oversampled": 0, "defect_oversampled": 8}
    assert counts["val"] == {"good": 6, "defect": 6}
    defects = sorted((tmp_path / "if" / "train" / "defect").iterdir())
    assert len(defects) == 16 and all(p.is_symlink() for p in defects)
    # every defect image appears exactly twice, each link resolves to a labelled defect file
    targets = pd.Series([str(p.resolve()) for p in defects]).value_counts()
    assert (targets == 2).all() and set(targets.index) == set(train[train.label == 1].path)
    assert {p.name for p in (tmp_path / "if" / "val" / "good").iterdir()} == {
        f"{i}.png" for i in val[val.label == 0].image_id
    }
    unbalanced = build_imagefolder(train, val, tmp_path / "if2", balance=False)
    assert unbalanced["train"] == {"good": 16, "defect": 8}


def test_imagefolder_refuses_bad_splits(sft, tmp_path):
    train, val = read_sft_jsonl(sft["train"]), read_sft_jsonl(sft["val"])
    with pytest.raises(ValueError, match="in both the SFT train and val"):
        build_imagefolder(train, pd.concat([val, train.iloc[:1]]), tmp_path / "a")
    with pytest.raises(ValueError, match="no 'defect' images"):
        build_imagefolder(train[train.label == 0], val, tmp_path / "b")
    gone = train.copy()
    gone.loc[0, "path"] = str(tmp_path / "nowhere.png")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        build_imagefolder(gone, val, tmp_path / "c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_sft_jsonl(bad)
    with pytest.raises(ValueError, match="supervised"):
        train_edge(EdgeConfig(mode="imagenet_rule"), sft["train"], sft["val"], tmp_path / "w", tmp_path / "o")


@pytest.fixture(scope="module")
def trained(sft, tmp_path_factory) -> tuple[EdgeConfig, dict, Path]:
    """One training run for the module: (config, train_edge's summary, its work folder)."""
    root = tmp_path_factory.mktemp("edge-train")
    cfg = EdgeConfig(mode="supervised", imgsz=32, batch_size=5, progress=False,
                     train={"epochs": 2, "batch": 8, "auto_augment": None})
    return cfg, train_edge(cfg, sft["train"], sft["val"], root / "work", root / "out"), root / "work"


def test_train_then_predict_supervised(sft, trained, tmp_path):
    cfg, info, work = trained
    model = Path(info["model"])
    assert model.name == "model.json" and model.is_file()
    assert Path(info["weights"]) == model.with_name("model.safetensors") and Path(info["weights"]).is_file()
    assert sorted(info["names"].values()) == ["defect", "good"] and info["epochs_run"] == 2
    # the last epoch's weights by default (the val split may share images with the evaluation set)
    assert info["checkpoint"] == "last"
    assert info["val_top1"] == info["val_top1_by_epoch"][-1]
    assert info["model_id"] == model_id_of(model)
    assert 0.0 <= info["val_top1"] <= 1.0 and len(info["val_top1_by_epoch"]) == 2
    loaded = load_classifier(model)
    assert loaded.num_classes == 2

    holdout = read_sft_jsonl(sft["holdout"])
    run = predict_edge(cfg, holdout, tmp_path / "edge.parquet", tmp_path / "cache", weights=model)
    df = read_table(tmp_path / "edge.parquet")
    assert list(df.columns) == SCHEMAS["edge_predictions"].names and len(df) == len(holdout)
    assert df.image_id.tolist() == holdout.image_id.tolist()
    assert (df["mode"] == "supervised").all() and (df.model_id == info["model_id"]).all()
    p = df.p_defect.to_numpy()
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert df.verdict.tolist() == (p >= 0.5).astype(int).tolist()
    np.testing.assert_allclose(df.smax, np.maximum(p, 1 - p), atol=1e-9)
    np.testing.assert_allclose(df.margin, np.abs(2 * p - 1), atol=1e-9)
    h = -(p * np.log(np.clip(p, 1e-300, 1)) + (1 - p) * np.log(np.clip(1 - p, 1e-300, 1))) / math.log(2)
    np.testing.assert_allclose(df.entropy, h, atol=1e-9)
    assert set(df.top1_name) <= {"good", "defect"} and run["defect_threshold"] == 0.5


def test_trained_model_is_kept_without_pickle(sft, trained, tmp_path, monkeypatch):
    import torch

    from saec.tasks.edge.preprocess import load_classify, to_nchw_float

    cfg, info, work = trained
    out = Path(info["model"]).parent
    assert not list(out.glob("*.pt"))
    for f in out.iterdir():  # neither a pickle nor torch's zip of one
        head = f.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f.name
    holdout = read_sft_jsonl(sft["holdout"])
    x = torch.from_numpy(to_nchw_float(np.stack([load_classify(p, cfg.imgsz) for p in holdout.path])))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    with monkeypatch.context() as m:
        for name in ("load", "loads", "Unpickler"):
            m.setattr(pickle, name, refuse)
        m.setattr(torch, "load", refuse)
        loaded = load_classifier(info["model"])
        with torch.inference_mode():
            got = loaded.module(x)
    # the same logits as the module the trainer wrote (its last epoch), loaded as Ultralytics does
    reference = load_classifier(work / "run" / "weights" / "last.pt")
    with torch.inference_mode():
        want = reference.module(x)
    assert torch.equal(got, want) and loaded.names == reference.names
    # the model id follows the content of both files, not their folder
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("model.json", "model.safetensors"):
        (copy / f).write_bytes((out / f).read_bytes())
    assert model_id_of(copy / "model.json") == info["model_id"]
    (copy / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes() + b" ")
    assert model_id_of(copy / "model.json") != info["model_id"]
    # and the same predictions
    a = predict_edge(cfg, holdout, tmp_path / "a.parquet", tmp_path / "cache", weights=info["model"])
    last = work / "run" / "weights" / "last.pt"
    b = predict_edge(cfg, holdout, tmp_path / "b.parquet", tmp_path / "cache", weights=last)
    assert a["runtime"] == b["runtime"]
    pa, pb = read_table(tmp_path / "a.parquet"), read_table(tmp_path / "b.parquet")
    np.testing.assert_array_equal(pa.p_defect, pb.p_defect)
    assert pa.verdict.tolist() == pb.verdict.tolist()


def test_edge_training_shows_its_progress(sft, tmp_path, capfd):
    """Ultralytics prints nothing here (verbose off): the stage's own bar moves batch by batch and
    gives the epoch, the loss, training images/s and validation accuracy; progress=False shows nothing."""
    cfg = EdgeConfig(mode="supervised", imgsz=32, batch_size=5, progress=True,
                     train={"epochs": 2, "batch": 8, "auto_augment": None})
    train_edge(cfg, sft["train"], sft["val"], tmp_path / "w", tmp_path / "o")
    err = capfd.readouterr().err
    assert "edge training" in err and "epoch=2/2" in err
    # counted in batches (8 images each, several an epoch), every one of both epochs
    n, total = map(int, re.findall(r"edge training: *\d+%\|[^|]*\| *(\d+)/(\d+)", err)[-1])
    assert n == total and total % 2 == 0 and total > 2
    assert "loss=" in err and "img_s=" in err and "val_acc=" in err
    quiet = cfg.model_copy(update={"progress": False})
    train_edge(quiet, sft["train"], sft["val"], tmp_path / "w2", tmp_path / "o2")
    assert "edge training" not in capfd.readouterr().err


def test_fine_tuning_starts_from_a_saved_model_json(sft, tmp_path):
    """edge.weights may be a model.json SAEC saved (the embedded default: the shipped stand-in):
    training starts from its weights, head included, rebuilt without unpickling anything. With a
    learning rate of ~0 the trained weights are the stand-in's (a fresh start would be random)."""
    import torch
    from safetensors.torch import load_file

    from saec.standins import standin

    cfg = EdgeConfig(mode="supervised", weights=str(standin("edge")), imgsz=32, batch_size=5, progress=False,
                     train={"epochs": 1, "batch": 8, "optimizer": "SGD", "lr0": 1e-12,
                            "extra": {"warmup_epochs": 0, "momentum": 0.0, "weight_decay": 0.0}})
    info = train_edge(cfg, sft["train"], sft["val"], tmp_path / "w", tmp_path / "o")
    start = load_file(str(standin("edge").with_name("model.safetensors")))
    end = load_file(info["weights"])
    weights = [k for k in start if k.endswith(("conv.weight", "linear.weight"))]
    assert len(weights) > 10 and set(weights) <= set(end)
    # Ultralytics keeps its checkpoints in half precision: equal to that rounding
    assert all(torch.allclose(end[k], start[k], rtol=1e-2, atol=1e-3) for k in weights)
    assert info["names"] == {"0": "defect", "1": "good"}


def test_a_json_that_is_not_a_saved_edge_model_is_refused_before_work(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an edge model written by SAEC"):
        EdgeConfig(weights=str(tmp_path / "model.json"))
    with pytest.raises(ValueError, match="does not exist"):
        EdgeConfig(weights=str(tmp_path / "missing.json"))
