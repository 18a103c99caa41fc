"""Edge runtime on real files: preprocessing parity with Ultralytics, ONNX Runtime vs PyTorch vs
Ultralytics' own predict, the ONNX cache, and the edge_predictions table (imagenet_rule mode)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from saec.artifacts.schemas import SCHEMAS
from saec.artifacts.store import read_table
from saec.datasets.images import BadImage
from saec.tasks.edge import model as edge_model
from saec.tasks.edge import runtime as edge_runtime
from saec.tasks.edge.config import EdgeConfig, Thresholds
from saec.tasks.edge.measures import rule_verdict
from saec.tasks.edge.model import EdgeModelError, load_classifier
from saec.tasks.edge.runtime import onnx_for
from saec.tasks.edge.predict import calibrate_thresholds, predict_edge, run_edge
from saec.tasks.edge.preprocess import classify_uint8, decode_bgr, load_classify, to_nchw_float

IMGSZ = 64


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Files of several sizes, aspect ratios, modes and formats."""
    root = tmp_path_factory.mktemp("edge-images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:300]
    smooth = (128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    files = []

    def put(name: str, arr: np.ndarray, **kw) -> None:
        path = root / name
        Image.fromarray(arr).save(path, **kw)
        files.append(path)

    put("landscape.png", rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    put("portrait.png", rng.integers(0, 256, (210, 90, 3), dtype=np.uint8))
    put("grey.png", smooth[:150, :170])
    put("small.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))  # upscaled
    put("exact.png", rng.integers(0, 256, (IMGSZ, IMGSZ, 3), dtype=np.uint8))
    put("photo.jpg", np.dstack([smooth, smooth[::-1], smooth.T]), quality=90)
    put("odd.png", rng.integers(0, 256, (97, 131, 3), dtype=np.uint8))
    return files


@pytest.fixture(scope="module")
def spread_weights(tmp_path_factory, images) -> Path:
    """A seeded YOLO11n-cls checkpoint with informative outputs on `images`.

    Freshly initialised weights give a near-uniform softmax, which would make any numerical
    comparison of probabilities meaningless: the batch-norm statistics are set from the test
    images themselves and the head is rescaled, so that probabilities vary between images.
    """
    ul = edge_model.ultralytics()
    torch.manual_seed(0)
    yolo = ul.YOLO("yolo11n-cls.yaml", task="classify")
    net = yolo.model
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # cumulative average over the calibration batch
            mod.reset_running_stats()
    x = torch.from_numpy(to_nchw_float(np.stack([load_classify(p, IMGSZ) for p in images])))
    net.train()
    with torch.no_grad():
        net(x)
        net.eval()
        head = net.model[-1].linear
        logits = net(x)[1]
        head.weight.mul_(16.0 / float((logits - logits.mean(1, keepdim=True)).abs().max()))  # |logit| up to 16
    path = tmp_path_factory.mktemp("weights") / "spread-cls.pt"
    yolo.save(path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One ONNX cache for the module: each (weights, imgsz) is exported once."""
    return tmp_path_factory.mktemp("onnx-cache")


def _rule_cfg(weights: Path, **kw) -> EdgeConfig:
    return EdgeConfig(mode="imagenet_rule", weights=str(weights), imgsz=IMGSZ, batch_size=3, progress=False, **kw)


def test_preprocessing_matches_ultralytics_classify_transforms(images):
    from ultralytics.data.augment import classify_transforms

    for size in (IMGSZ, 224):
        tf = classify_transforms(size)
        for path in images:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            ref = tf(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))).numpy()
            ours = to_nchw_float(load_classify(path, size)[None])[0]
            assert ours.shape == ref.shape == (3, size, size)
            np.testing.assert_array_equal(ours, ref, err_msg=f"{path.name} at {size}")


def test_decode_matches_ultralytics_imread(images):
    from ultralytics.utils.patches import imread

    for path in images:
        np.testing.assert_array_equal(decode_bgr(path), imread(str(path)))


def test_onnxruntime_torch_and_ultralytics_predict_agree(images, spread_weights, tmp_path, cache):
    cfg = _rule_cfg(spread_weights, runtime="onnxruntime")
    model = load_classifier(spread_weights)
    paths = [str(p) for p in images]
    ort_df, ort_info = run_edge(cfg, paths, cache, model=model)
    torch_df, torch_info = run_edge(cfg.model_copy(update={"runtime": "torch"}), paths, cache, model=model)
    assert ort_info["runtime"] == "onnxruntime" and torch_info["runtime"] == "torch"
    assert ort_df.smax.min() < 0.9 and ort_df.smax.max() > 0.2  # informative, not a uniform softmax
    for col in ("smax", "margin", "entropy"):
        np.testing.assert_allclose(ort_df[col], torch_df[col], atol=1e-4, err_msg=col)
    assert (ort_df.top1_class == torch_df.top1_class).all()

    # Ultralytics' own one-file-at-a-time predict, on the same checkpoint and size. One image at a
    # time against a batch, the CPU's convolution kernels sum in another order: with these spread
    # logits that moved a softmax by 1.1e-4 on an AVX2-only machine. A preprocessing difference
    # moves it by far more.
    yolo = edge_model.ultralytics().YOLO(str(spread_weights), task="classify")
    for path, smax, top1 in zip(paths, torch_df.smax, torch_df.top1_class):
        probs = yolo.predict(path, imgsz=IMGSZ, device="cpu", verbose=False)[0].probs
        assert int(probs.top1) == top1, path
        assert float(probs.top1conf) == pytest.approx(smax, abs=5e-4), path


def test_onnx_cache_by_weights_and_size(spread_weights, tmp_path):
    model = load_classifier(spread_weights)
    assert model.model_id == hashlib.sha256(spread_weights.read_bytes()).hexdigest()[:16]
    first = onnx_for(model, IMGSZ, tmp_path)
    stamp = first.stat().st_mtime_ns
    again = onnx_for(load_classifier(spread_weights), IMGSZ, tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp  # reused, not exported again
    other = onnx_for(model, IMGSZ + 32, tmp_path)
    assert other != first and other.name.startswith(model.model_id)
    meta = edge_runtime.read_onnx_meta(first)
    check = meta["verification_vs_torch"]
    assert check["max_logit_diff"] <= 1e-4 * max(1.0, check["max_abs_logit"]) and meta["imgsz"] == IMGSZ


def test_yaml_models_are_seeded():
    a, b, c = (load_classifier("yolo11n-cls.yaml", seed=s) for s in (3, 3, 4))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(a.module(x), b.module(x)) and not torch.equal(a.module(x), c.module(x))
    assert a.model_id == b.model_id != c.model_id and a.model_id.startswith("yaml-")
    assert a.num_classes == 1000


def test_predict_edge_rule_table(images, spread_weights, tmp_path, cache):
    cfg = _rule_cfg(spread_weights, smax_thr=0.5, margin_thr=0.1, ent_thr=0.5)
    manifest = pd.DataFrame({"image_id": [f"id{i}" for i in range(len(images))], "path": [str(p) for p in images],
                             "source_path": [f"/data/{i}.jpg" if i else None for i in range(len(images))]})
    info = predict_edge(cfg, manifest, tmp_path / "edge.parquet", cache)
    df = read_table(tmp_path / "edge.parquet")
    assert list(df.columns) == SCHEMAS["edge_predictions"].names
    assert df.image_id.tolist() == manifest.image_id.tolist() and df.path.tolist() == manifest.path.tolist()
    assert df.source_path.tolist() == manifest.source_path.tolist()  # the user's file beside each verdict, null if unknown
    assert df.p_defect.isna().all() and (df["mode"] == "imagenet_rule").all()
    assert (df.runtime == "onnxruntime").all() and info["runtime_fallback_reason"] is None
    assert (df.model_id == hashlib.sha256(spread_weights.read_bytes()).hexdigest()[:16]).all()
    expected = rule_verdict(df.smax, df.margin, df.entropy, Thresholds(smax_thr=0.5, margin_thr=0.1, ent_thr=0.5))
    assert df.verdict.tolist() == expected.tolist() and 0 < expected.sum() < len(df)  # both verdicts occur
    assert df.batch_index.tolist() == [0, 0, 0, 1, 1, 1, 2] and (df.imgsz == IMGSZ).all()
    assert ((df.entropy >= 0) & (df.entropy <= 1)).all() and (df.margin <= df.smax).all()
    assert info["rows"] == len(images) and info["thresholds"]["smax_thr"] == 0.5


def test_predict_edge_refuses_uncalibrated_rule_and_bad_files(images, spread_weights, tmp_path, cache):
    manifest = pd.DataFrame({"image_id": ["a", "b"], "path": [str(images[0]), str(tmp_path / "broken.png")]})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="calibrate_thresholds"):
        predict_edge(_rule_cfg(spread_weights, ent_thr=None), manifest, tmp_path / "x.parquet", cache)
    with pytest.raises(BadImage, match="broken.png"):
        predict_edge(_rule_cfg(spread_weights), manifest, tmp_path / "x.parquet", cache)
    assert not (tmp_path / "x.parquet").exists()
    with pytest.raises(EdgeModelError, match="'good' and 'defect'"):
        predict_edge(
            EdgeConfig(mode="supervised", weights=str(spread_weights), imgsz=IMGSZ, progress=False),
            manifest.iloc[:1], tmp_path / "x.parquet", cache,
        )


def test_int8_runtime(images, spread_weights, tmp_path, cache):
    cfg = _rule_cfg(spread_weights, precision="int8", runtime="onnxruntime")
    manifest = pd.DataFrame({"image_id": [p.name for p in images], "path": [str(p) for p in images]})
    info = predict_edge(cfg, manifest, tmp_path / "q.parquet", cache, int8_calibration=[str(p) for p in images])
    df = read_table(tmp_path / "q.parquet")
    assert (df.runtime == "onnxruntime-int8").all() and info["runtime"] == "onnxruntime-int8"
    assert info["int8"]["calibration"] == "given" and info["int8"]["images"] == len(images)
    assert Path(info["onnx_path"]).name.split("-int8-")[0] == f"{df.model_id.iloc[0]}-{IMGSZ}-op17"
    ref, _ = run_edge(_rule_cfg(spread_weights), [str(p) for p in images], cache)
    # the recorded comparison with the float graph is what this run shows (same images)
    assert np.abs(df.smax - ref.smax).max() <= info["int8"]["max_prob_diff_vs_fp32"] + 1e-6
    assert (df.top1_class == ref.top1_class).mean() == pytest.approx(info["int8"]["top1_agreement_vs_fp32"])
    assert not np.allclose(df.smax, ref.smax, atol=1e-6)  # it is a different (quantized) graph
    with pytest.raises(ValueError, match="runs on ONNX Runtime"):
        _rule_cfg(spread_weights, precision="int8", runtime="torch")


def test_empty_manifest_gives_an_empty_table(spread_weights, tmp_path, cache):
    empty = pd.DataFrame({"image_id": pd.Series(dtype=str), "path": pd.Series(dtype=str)})
    info = predict_edge(_rule_cfg(spread_weights), empty, tmp_path / "e.parquet", cache)
    df = read_table(tmp_path / "e.parquet")
    assert info["rows"] == 0 and len(df) == 0 and list(df.columns) == SCHEMAS["edge_predictions"].names


def test_calibration_on_good_images(images, spread_weights, cache):
    cfg = _rule_cfg(spread_weights, smax_thr=None, margin_thr=None, ent_thr=None)
    t = calibrate_thresholds(cfg, pd.DataFrame({"path": [str(p) for p in images]}), cache)
    df, _ = run_edge(cfg, [str(p) for p in images], cache)
    assert t.source == "calibrated"
    assert t.smax_thr == pytest.approx(np.quantile(df.smax, 0.2))
    assert t.margin_thr == pytest.approx(np.quantile(df.margin, 0.2))
    assert t.ent_thr == pytest.approx(np.quantile(df.entropy, 0.8))
    with pytest.raises(ValueError, match="at least one"):
        calibrate_thresholds(cfg, [], cache)


def test_auto_runtime_falls_back_to_torch_with_a_reason(images, spread_weights, tmp_path, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("no ONNX today")

    monkeypatch.setattr(edge_runtime, "onnx_for", broken)
    df, info = run_edge(_rule_cfg(spread_weights), [str(images[0])], tmp_path)
    assert info["runtime"] == "torch" and "no ONNX today" in info["runtime_fallback_reason"]
    with pytest.raises(RuntimeError, match="no ONNX today"):
        run_edge(_rule_cfg(spread_weights, runtime="onnxruntime"), [str(images[0])], tmp_path)


def test_classify_uint8_crop_geometry():
    # a 100x300 image whose columns encode their index: the centre crop must keep the middle columns
    arr = np.tile(np.linspace(0, 255, 300).astype(np.uint8), (100, 1))
    out = classify_uint8(np.dstack([arr] * 3), 100)
    assert out.shape == (100, 100, 3)
    np.testing.assert_array_equal(out[:, :, 0], arr[:, 100:200])
