"""SFT files for the cloud model: chat-form JSONL plus Parquet manifests.

Per category: train = every `train/good` image (label 0) plus the first
`defect_train_ratio` share of the category's shuffled `test/<defect>` images
(label 1); val = every `test/good` image plus the remaining defects.

A defect image with a ground-truth mask also gets an `explain` target: the bounding boxes of
the mask's regions (in the image file's pixels) and its defect type in words. Training can
teach the model to explain its defect verdicts from it (`CloudTrainConfig.explain_turn`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from saec.artifacts.store import StageResult, atomic_path, write_table
from saec.datasets.images import BadImage, mask_boxes
from saec.prompts import chat_messages
from saec.tasks.cloud.explain import ExplainTarget, describe_defect
from saec.tasks.stage import Built, stage

log = logging.getLogger(__name__)

COLS = ["image_id", "path", "source_path", "label", "category", "defect_type", "split", "width", "height", "mode"]


class SFTConfig(BaseModel):
    """Seed values: half of each category's test defects train, seed 42."""

    model_config = ConfigDict(extra="forbid")
    defect_train_ratio: float = Field(0.5, ge=0.0, le=1.0)
    seed: int = 42


def split_sft(images: pd.DataFrame, cfg: SFTConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val) manifests from a scanned MVTec AD table."""
    rng = np.random.default_rng(cfg.seed)
    images = images.sort_values("rel_path", kind="stable")
    train_parts, val_parts = [], []
    for _cat, rows in images.groupby("category", sort=True):
        defects = rows[(rows.split == "test") & (rows.label == 1)]
        defects = defects.iloc[rng.permutation(len(defects))]
        n_train = int(len(defects) * cfg.defect_train_ratio)
        train_parts += [rows[(rows.split == "train") & (rows.label == 0)], defects.iloc[:n_train]]
        val_parts += [rows[(rows.split == "test") & (rows.label == 0)], defects.iloc[n_train:]]

    def manifest(parts: list[pd.DataFrame], split: str) -> pd.DataFrame:
        df = pd.concat(parts) if parts else images.iloc[:0]
        return df.assign(source_path=df.path, split=split)[COLS].reset_index(drop=True)

    return manifest(train_parts, "sft_train"), manifest(val_parts, "sft_val")




def explain_target(mask_path: str | Path | None, defect_type: str, size: tuple[int, int]) -> tuple[dict | None, str]:
    """The `explain` field of a defect example of `size` (w, h), or None and why there is none.

    No target for an image without a mask, with an empty or unreadable mask, or with a mask
    of another size than the image (its boxes would point elsewhere).
    """
    if mask_path is None or (isinstance(mask_path, float) and np.isnan(mask_path)):
        return None, "no_mask"
    try:
        boxes, w, h = mask_boxes(mask_path)
    except BadImage as exc:
        log.warning("no explanation target for %s: mask %s: %s", defect_type, mask_path, exc)
        return None, "unreadable_mask"
    if (w, h) != tuple(size):
        log.warning("no explanation target: mask %s is %dx%d, its image %dx%d", mask_path, w, h, *size)
        return None, "mask_size_mismatch"
    if not boxes:
        return None, "empty_mask"
    target = ExplainTarget(bboxes=boxes, desc=describe_defect(defect_type), width=w, height=h)
    return target.model_dump(), "ok"


def write_jsonl(manifest: pd.DataFrame, path: Path, masks: dict[str, str] | None = None,
                counts: dict[str, int] | None = None) -> Path:
    """One chat-form example per line: the user turn holds the image and instruction, the assistant the label.

    `masks` maps image ids of defect images to their ground-truth masks, which give the
    examples their `explain` targets; `counts`, when given, tallies the defect examples by
    whether they got one ("ok") or why not.
    """
    masks = masks or {}
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for row in manifest.itertuples(index=False):
            record = {
                "image_id": row.image_id,
                "image": row.path,
                "label": int(row.label),
                "category": row.category,
                "defect_type": row.defect_type,
                "messages": chat_messages(row.path, int(row.label)),
            }
            if int(row.label) == 1:
                target, why = explain_target(masks.get(row.image_id), row.defect_type, (row.width, row.height))
                if target is not None:
                    record["explain"] = target
                if counts is not None:
                    counts[why] = counts.get(why, 0) + 1
            fh.write(json.dumps(record) + "\n")
    return path


def mask_paths(images: pd.DataFrame) -> dict[str, str]:
    """image_id -> mask file of every scanned image that has one."""
    if "mask_path" not in images:
        return {}
    has = images[images.mask_path.notna()]
    return dict(zip(has.image_id, has.mask_path))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@stage("sft", task="build-sft")
def sft_task(out: Path, scan: StageResult, cfg: SFTConfig) -> Built:
    """Train/val JSONL and their manifests from the MVTec AD scan."""
    images = scan.table("images")
    train, val = split_sft(images, cfg)
    masks = mask_paths(images)
    targets: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    files = {
        "train_jsonl": write_jsonl(train, out / "sft_train.jsonl", masks, targets["train"]),
        "val_jsonl": write_jsonl(val, out / "sft_val.jsonl", masks, targets["val"]),
        "train_manifest": Path(write_table(train, "manifest", out / "sft_train.parquet").path),
        "val_manifest": Path(write_table(val, "manifest", out / "sft_val.parquet").path),
    }
    info = {
        "train": {"good": int((train.label == 0).sum()), "defect": int((train.label == 1).sum())},
        "val": {"good": int((val.label == 0).sum()), "defect": int((val.label == 1).sum())},
        "defect_train_ratio": cfg.defect_train_ratio,
        "seed": cfg.seed,
        "explain_targets": targets,  # defect examples by explanation target: "ok" or why none
    }
    return files, info
