"""Routing: which images keep the edge verdict and which the cloud decides.

Two rules, in order (SEED-ALGORITHMS §4):

1. Complexity quota: the `init_q_ratio` share of images with the highest scene
   complexity go straight to the cloud (ties broken by image id, so the split is
   reproducible). The edge never sees them.
2. Edge confidence: every other image runs on the edge. Its verdict stands when
   the edge is confident in it, otherwise the image goes to the cloud as well:

   - a *good* verdict stands iff smax >= smax_thr, margin >= margin_thr and
     entropy <= ent_thr;
   - a *defect* verdict stands iff `keep_bidir` is on and the same three tests
     pass with the margin test tightened to margin >= max(margin_thr, bidir_margin_min).

   smax, margin and entropy describe the edge's confidence *in the verdict it gave*.
   For the supervised edge (two classes, good/defect) that makes the defect branch
   live: a confident defect verdict stays at the edge. For the published run's ImageNet
   rule the verdict itself is "defect iff the three tests fail", so no defect
   verdict can ever pass them; the routing table says so (`bidir_live = False`)
   rather than pretending the switch does something.

The cloud's verdict is P(defect) >= `cloud_thr`, applied here at merge time so the
threshold can change without scoring any image again.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from saec.artifacts.schemas import text_column


class RoutingConfig(BaseModel):
    """Seed values of the published SAEC run."""

    model_config = ConfigDict(extra="forbid")
    init_q_ratio: float = Field(0.30, ge=0.0, le=1.0, description="share of most complex images sent straight to the cloud")
    smax_thr: float = Field(0.55, ge=0.0, le=1.0)
    margin_thr: float = Field(0.03, ge=0.0, le=1.0)
    ent_thr: float = Field(0.95, ge=0.0, le=1.0)
    keep_bidir: bool = True
    bidir_margin_min: float = Field(0.08, ge=0.0, le=1.0)
    cloud_thr: float = Field(0.26, ge=0.0, le=1.0, description="cloud verdict: defect iff P(defect) >= cloud_thr")


def complexity_quota(complexity: pd.DataFrame, ratio: float) -> pd.DataFrame:
    """Rank images by complexity (highest first) and mark the top `ratio` share for the cloud."""
    ranked = complexity[["image_id", "complexity"]].sort_values(
        ["complexity", "image_id"], ascending=[False, True], kind="stable"
    )
    n_cloud = int(round(ratio * len(ranked)))
    ranked = ranked.assign(complexity_rank=np.arange(len(ranked), dtype=np.int32))
    return ranked.assign(to_cloud=ranked.complexity_rank < n_cloud).reset_index(drop=True)


def edge_keeps(edge: pd.DataFrame, cfg: RoutingConfig) -> pd.Series:
    """Which edge verdicts stand (index aligned with `edge`)."""
    confident = (edge.smax >= cfg.smax_thr) & (edge.entropy <= cfg.ent_thr)
    good = (edge.verdict == 0) & confident & (edge.margin >= cfg.margin_thr)
    defect = (edge.verdict == 1) & confident & (edge.margin >= max(cfg.margin_thr, cfg.bidir_margin_min))
    return good | (defect & cfg.keep_bidir)


def route_images(ranked: pd.DataFrame, edge: pd.DataFrame, cfg: RoutingConfig,
                 manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The routing table: one row per image with its branch and the reason for it.

    `ranked` comes from `complexity_quota`; `edge` holds the edge's measures for (at least)
    every image not sent to the cloud by the quota; `manifest`, where given, the images' paths
    (`path`, `source_path`), which the table carries (null without it).
    """
    e = edge.set_index("image_id")
    need = ranked.loc[~ranked.to_cloud, "image_id"]
    missing = need[~need.isin(e.index)]
    if len(missing):
        raise ValueError(f"{len(missing)} image(s) routed to the edge have no edge prediction, e.g. {missing.iloc[0]}")
    keep = edge_keeps(e, cfg)
    verdict = e.verdict.reindex(ranked.image_id).to_numpy()
    kept = keep.reindex(ranked.image_id).fillna(False).to_numpy(dtype=bool)
    to_cloud = ranked.to_cloud.to_numpy()
    reason = np.where(
        to_cloud,
        "complexity_quota",
        np.where(kept, np.where(verdict == 1, "edge_confident_defect", "edge_confident_good"), "edge_uncertain"),
    )
    branch = np.where(to_cloud | ~kept, "cloud", "edge")
    where = manifest.set_index("image_id").reindex(ranked.image_id) if manifest is not None else None
    none = np.full(len(ranked), None, dtype=object)
    return pd.DataFrame(
        {
            "image_id": ranked.image_id.to_numpy(),
            "path": where.path.to_numpy() if where is not None else none,
            "source_path": where.source_path.to_numpy() if where is not None and "source_path" in where else none,
            "complexity": ranked.complexity.to_numpy(dtype=float),
            "complexity_rank": ranked.complexity_rank.to_numpy(),
            "branch": branch,
            "reason": reason,
            "edge_verdict": pd.array(np.where(to_cloud, pd.NA, verdict), dtype="Int8"),
        }
    )


def bidir_live(edge_mode: str) -> bool:
    """Whether a defect verdict can pass the keep test at all with this edge mode (see module doc)."""
    return edge_mode != "imagenet_rule"


def merge_decisions(
    labels: pd.DataFrame, routing: pd.DataFrame, edge: pd.DataFrame, cloud: pd.DataFrame, cfg: RoutingConfig
) -> pd.DataFrame:
    """SAEC's final decisions: the edge verdict where it stood, the cloud verdict elsewhere."""
    r = routing.set_index("image_id")
    to_cloud = r.index[r.branch == "cloud"]
    c = cloud.set_index("image_id")
    missing = to_cloud.difference(c.index)
    if len(missing):
        raise ValueError(f"{len(missing)} image(s) routed to the cloud have no cloud score, e.g. {missing[0]}")
    e = edge.set_index("image_id")
    ids = labels.image_id
    branch = r.branch.reindex(ids).to_numpy()
    cloud_p = c.p_defect.reindex(ids).to_numpy(dtype=float)
    edge_v = e.verdict.reindex(ids).to_numpy(dtype=float)
    edge_p = e.p_defect.reindex(ids).to_numpy(dtype=float) if "p_defect" in e else np.full(len(ids), np.nan)
    pred = np.where(branch == "cloud", cloud_p >= cfg.cloud_thr, edge_v == 1).astype(np.int8)
    score = np.where(branch == "cloud", cloud_p, edge_p)
    return decisions_frame(labels, pred, score, "saec", branch, r.reason.reindex(ids).to_numpy())


def decisions_frame(labels: pd.DataFrame, pred, score, system: str, branch, reason) -> pd.DataFrame:
    """One decision per row of `labels` (an evaluation manifest: image_id, label, and where present
    the image's path, its source file, category and defect type, carried into the table)."""
    label = labels.label.to_numpy(dtype=np.int8)
    pred = np.asarray(pred, dtype=np.int8)

    return pd.DataFrame(
        {
            "image_id": labels.image_id.to_numpy(),
            "path": text_column(labels, "path"),
            "source_path": text_column(labels, "source_path"),
            "category": text_column(labels, "category"),
            "defect_type": text_column(labels, "defect_type"),
            "label": label,
            "pred": pred,
            "correct": pred == label,
            "branch": branch,
            "reason": reason,
            "score": np.asarray(score, dtype=float),
            "system": system,
        }
    )
