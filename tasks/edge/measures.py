"""Confidence measures of a classifier's softmax, the published run's rule, and threshold calibration.

All functions take whole batches (arrays of shape (N, C)) and are vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saec.tasks.edge.config import EdgeConfig, Thresholds


@dataclass(frozen=True)
class Measures:
    """Per-image measures of one batch of logits (all arrays of length N)."""

    probs: np.ndarray  # (N, C) float64 softmax
    smax: np.ndarray  # top-1 probability
    margin: np.ndarray  # top-1 minus top-2 probability
    entropy: np.ndarray  # Shannon entropy (natural log) divided by ln(C): 0 = certain, 1 = uniform
    top1: np.ndarray  # int index of the top-1 class


def softmax_measures(logits: np.ndarray) -> Measures:
    """smax, margin and normalised entropy of softmax(logits), computed in float64."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"expected logits of shape (N, C) with C >= 2, got {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    probs = np.exp(log_p)
    return measures_from_probs(probs, log_p)


def measures_from_probs(probs: np.ndarray, log_p: np.ndarray | None = None) -> Measures:
    """The same measures from probabilities that already sum to 1 (zeros allowed)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"expected probabilities of shape (N, C) with C >= 2, got {p.shape}")
    n_classes = p.shape[1]
    top2 = np.partition(p, n_classes - 2, axis=1)[:, -2:]  # [second, first]
    if log_p is None:
        with np.errstate(divide="ignore"):
            log_p = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = -(p * log_p).sum(axis=1) / np.log(n_classes)
    return Measures(
        probs=p,
        smax=top2[:, 1],
        margin=top2[:, 1] - top2[:, 0],
        entropy=np.clip(entropy, 0.0, 1.0),
        top1=p.argmax(axis=1),
    )


def rule_good(smax: np.ndarray, margin: np.ndarray, entropy: np.ndarray, t: Thresholds) -> np.ndarray:
    """The published run's test: True where smax >= T1 and margin >= T2 and entropy <= T3."""
    return (np.asarray(smax) >= t.smax_thr) & (np.asarray(margin) >= t.margin_thr) & (np.asarray(entropy) <= t.ent_thr)


def rule_verdict(smax: np.ndarray, margin: np.ndarray, entropy: np.ndarray, t: Thresholds) -> np.ndarray:
    """imagenet_rule verdicts as int8: 0 good (confident), 1 defect (anything else)."""
    return (~rule_good(smax, margin, entropy, t)).astype(np.int8)


def thresholds_from_measures(
    smax: np.ndarray,
    margin: np.ndarray,
    entropy: np.ndarray,
    quantiles: tuple[float, float, float] = (0.20, 0.20, 0.80),
    cfg: EdgeConfig | None = None,
) -> Thresholds:
    """Calibrated thresholds: quantiles of smax, margin and entropy over good images.

    With `cfg`, a threshold the config sets explicitly is kept and only the missing ones
    (None) are filled from the quantiles.
    """
    smax, margin, entropy = (np.asarray(a, dtype=np.float64) for a in (smax, margin, entropy))
    if smax.size == 0:
        raise ValueError("cannot calibrate edge thresholds on zero images; give train/good images")
    q1, q2, q3 = quantiles
    calibrated = {
        "smax_thr": float(np.quantile(smax, q1)),
        "margin_thr": float(np.quantile(margin, q2)),
        "ent_thr": float(np.quantile(entropy, q3)),
    }
    given = {} if cfg is None else {k: getattr(cfg, k) for k in calibrated if getattr(cfg, k) is not None}
    source = "calibrated" if not given else ("config" if len(given) == 3 else "mixed")
    return Thresholds(**(calibrated | given), source=source)
