"""Classification metrics of a decisions table, and energy per correct decision."""
from __future__ import annotations

import numpy as np
import pandas as pd


def auroc(label: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve by the rank statistic (ties counted half); None without both classes."""
    ok = ~np.isnan(score)
    label, score = label[ok], score[ok]
    n_pos, n_neg = int((label == 1).sum()), int((label == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return float((ranks[label == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(decisions: pd.DataFrame) -> dict:
    y = decisions.label.to_numpy()
    p = decisions.pred.to_numpy()
    tp = int(((y == 1) & (p == 1)).sum())
    tn = int(((y == 0) & (p == 0)).sum())
    fp = int(((y == 0) & (p == 1)).sum())
    fn = int(((y == 1) & (p == 0)).sum())
    n = len(y)
    acc_good = tn / (tn + fp) if tn + fp else None
    acc_defect = tp / (tp + fn) if tp + fn else None
    out = {
        "n": n,
        "n_good": tn + fp,
        "n_defect": tp + fn,
        "correct": tp + tn,
        "accuracy": (tp + tn) / n if n else None,
        "acc_good": acc_good,
        "acc_defect": acc_defect,
        "balanced_accuracy": (acc_good + acc_defect) / 2 if acc_good is not None and acc_defect is not None else None,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "cloud_share": float((decisions.branch == "cloud").mean()) if n else None,
    }
    score = decisions.score.to_numpy(dtype=float)
    # AUROC only where every decision carries a score (a mix of edge verdicts and scores is not a ranking)
    out["auroc"] = auroc(y, score) if n and not np.isnan(score).any() else None
    return out
