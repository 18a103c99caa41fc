"""Confidence measures, the published run's rule, calibration quantiles and config validation (no model)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from saec.tasks.edge.config import EdgeConfig, EdgeTrainConfig, Thresholds
from saec.tasks.edge.measures import (
    measures_from_probs,
    rule_verdict,
    softmax_measures,
    thresholds_from_measures,
)

SEED = Thresholds(smax_thr=0.55, margin_thr=0.03, ent_thr=0.95)


def test_measures_of_known_probability_vectors():
    p = np.array(
        [
            [0.7, 0.2, 0.1, 0.0],  # confident
            [0.25, 0.25, 0.25, 0.25],  # uniform
            [1.0, 0.0, 0.0, 0.0],  # certain
            [0.1, 0.45, 0.44, 0.01],  # top-1 is not the first class, tiny margin
        ]
    )
    m = measures_from_probs(p)
    np.testing.assert_allclose(m.smax, [0.7, 0.25, 1.0, 0.45])
    np.testing.assert_allclose(m.margin, [0.5, 0.0, 1.0, 0.01], atol=1e-12)
    h0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(4)
    h3 = -sum(x * math.log(x) for x in (0.1, 0.45, 0.44, 0.01)) / math.log(4)
    np.testing.assert_allclose(m.entropy, [h0, 1.0, 0.0, h3], atol=1e-12)
    assert m.top1.tolist() == [0, 0, 0, 1]


def test_softmax_measures_equal_probability_measures_and_are_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 1000)) * 3
    m = softmax_measures(logits)
    e = np.exp(logits - logits.max(1, keepdims=True))
    ref = measures_from_probs(e / e.sum(1, keepdims=True))
    for name in ("smax", "margin", "entropy"):
        np.testing.assert_allclose(getattr(m, name), getattr(ref, name), atol=1e-12)
    big = softmax_measures(np.array([[1000.0, 0.0], [0.0, 0.0]]))  # no overflow
    np.testing.assert_allclose(big.smax, [1.0, 0.5])
    np.testing.assert_allclose(big.entropy, [0.0, 1.0], atol=1e-12)  # two classes: normalised by ln 2


def test_rule_verdicts_on_the_seed_thresholds():
    smax = np.array([0.90, 0.54, 0.90, 0.90, 0.55])
    margin = np.array([0.50, 0.50, 0.02, 0.50, 0.03])
    ent = np.array([0.10, 0.10, 0.10, 0.96, 0.95])
    # good only where all three tests pass; the boundaries (>=, >=, <=) count as passing
    assert rule_verdict(smax, margin, ent, SEED).tolist() == [0, 1, 1, 1, 0]
    assert rule_verdict(smax, margin, ent, SEED).dtype == np.int8


def test_calibration_takes_the_seed_quantiles():
    smax = np.arange(1, 101) / 100.0  # 0.01 .. 1.00
    margin = smax / 2
    ent = 1 - smax
    t = thresholds_from_measures(smax, margin, ent)
    assert t.smax_thr == pytest.approx(np.quantile(smax, 0.2)) == pytest.approx(0.208)
    assert t.margin_thr == pytest.approx(np.quantile(margin, 0.2))
    assert t.ent_thr == pytest.approx(np.quantile(ent, 0.8))
    assert t.source == "calibrated"
    # the good images the thresholds came from: about 80 % pass each test on its own
    assert (smax >= t.smax_thr).mean() == pytest.approx(0.8, abs=0.011)
    # explicit config values win, only the None ones are calibrated
    cfg = EdgeConfig(mode="imagenet_rule", smax_thr=0.5, margin_thr=None, ent_thr=None)
    mixed = thresholds_from_measures(smax, margin, ent, cfg=cfg)
    assert mixed.smax_thr == 0.5 and mixed.margin_thr == pytest.approx(t.margin_thr) and mixed.source == "mixed"
    with pytest.raises(ValueError, match="zero images"):
        thresholds_from_measures([], [], [])


def test_config_defaults_and_validation(tmp_path):
    rule = EdgeConfig(mode="imagenet_rule")
    assert rule.imgsz == 448 and (rule.smax_thr, rule.margin_thr, rule.ent_thr) == (0.55, 0.03, 0.95)
    assert EdgeConfig().imgsz == 128 and EdgeConfig(imgsz=224).imgsz == 224
    assert EdgeConfig(smax_thr=None).needs_calibration and EdgeConfig(smax_thr=None).config_thresholds() is None
    with pytest.raises(ValidationError, match="yolo11s-cls.pt does not exist"):
        EdgeConfig(weights=str(tmp_path / "yolo11s-cls.pt"))
    with pytest.raises(ValidationError, match="URL"):
        EdgeConfig(weights="https://example.com/yolo11s-cls.pt")
    with pytest.raises(ValidationError, match="no such model definition"):
        EdgeConfig(weights="yolo99z-cls.yaml")
    with pytest.raises(ValidationError, match="expected a .pt"):
        EdgeConfig(weights=str(tmp_path / "model.onnx"))
    with pytest.raises(ValidationError):
        EdgeConfig(runtime="tensorrt")
    with pytest.raises(ValidationError, match="Ultralytics does not know"):
        EdgeTrainConfig(extra={"not_an_argument": 1})
    with pytest.raises(ValidationError, match="may not set"):
        EdgeTrainConfig(extra={"epochs": 3})
    assert EdgeTrainConfig(extra={"cos_lr": True}).ultralytics_args()["cos_lr"] is True
    weights = tmp_path / "mine.pt"
    weights.write_bytes(b"x")
    assert EdgeConfig(weights=str(weights)).weights == str(weights.resolve())
