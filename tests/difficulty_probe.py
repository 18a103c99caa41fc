"""How hard the synthetic data is for a model that does not look at local structure: a linear
classifier on global image statistics, cross-validated. The tests use it to check that the
generator's defects are not detectable from an image's overall brightness, contrast or colour."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def image_features(img: np.ndarray) -> np.ndarray:
    """Global hand-made features of one image: intensity and gradient statistics (and colour for RGB)."""
    arr = np.asarray(img, np.float32)
    grey = arr.mean(axis=2) if arr.ndim == 3 else arr
    q = np.percentile(grey, [0.5, 5, 50, 95, 99.5])
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    g = np.hypot(gx, gy)
    lap = np.abs(cv2.Laplacian(grey, cv2.CV_32F))
    feats = [grey.mean(), grey.std(), *q, g.mean(), g.std(), np.percentile(g, 99.5), lap.mean(),
             np.percentile(lap, 99.5)]
    if arr.ndim == 3:
        feats += list(arr.reshape(-1, 3).mean(0)) + list(arr.reshape(-1, 3).std(0))
    return np.asarray(feats, np.float64)


def linear_cv_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Balanced accuracy of a class-weighted, standardised L2 logistic regression, k-fold cross-validated."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    pred = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return float(balanced_accuracy_score(y, pred))


def quality_probe(root: str | Path, *, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Balanced CV accuracy per part of a folder written by `generate_all`: its MVTec-layout
    categories and "ksdd2". A value near 1.0 would mean the defects are detectable without looking
    at local structure."""
    root = Path(root)
    out: dict[str, float] = {}
    for cat_dir in sorted(p for p in (root / "mvtec_ad").iterdir() if p.is_dir()):
        files = sorted((cat_dir / "train" / "good").glob("*.png")) + sorted((cat_dir / "test").glob("*/*.png"))
        labels = np.array([int(p.parent.name != "good") for p in files])
        feats = np.stack([image_features(np.asarray(Image.open(p))) for p in files])
        out[cat_dir.name] = linear_cv_accuracy(feats, labels, folds, seed)
    ksdd2 = root / "ksdd2"
    if ksdd2.is_dir():
        images = sorted(p for p in ksdd2.glob("*/*.png") if not p.stem.endswith("_GT"))
        labels = np.array([int(np.asarray(Image.open(p.with_name(p.stem + "_GT.png"))).any()) for p in images])
        feats = np.stack([image_features(np.asarray(Image.open(p))) for p in images])
        out["ksdd2"] = linear_cv_accuracy(feats, labels, folds, seed)
    return out
