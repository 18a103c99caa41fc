"""SFT files for the cloud model: chat-form JSONL plus Parquet manifests.

Per category: train = every `train/good` image (label 0) plus the first
`defect_train_ratio` share of the category's shuffled `test/<defect>` images
(label 1); val = every `test/good` image plus the remaining defects.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from prefect import task

from saec.artifacts.store import StageResult, atomic_path, write_table
from saec.prompts import chat_messages
from saec.tasks.stage import STAGE_TASK, run_stage, stage_cache_key

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


def write_jsonl(manifest: pd.DataFrame, path: Path) -> Path:
    """One chat-form example per line: the user turn holds the image and instruction, the assistant the label."""
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
            fh.write(json.dumps(record) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@task(name="build-sft", cache_key_fn=stage_cache_key("sft", ["saec.prompts"]), **STAGE_TASK)
def sft_task(store: str, scan: StageResult, cfg: SFTConfig) -> StageResult:
    """Train/val JSONL and their manifests from the MVTec AD scan."""

    def build(out: Path):
        train, val = split_sft(scan.table("images"), cfg)
        files = {
            "train_jsonl": write_jsonl(train, out / "sft_train.jsonl"),
            "val_jsonl": write_jsonl(val, out / "sft_val.jsonl"),
            "train_manifest": Path(write_table(train, "manifest", out / "sft_train.parquet").path),
            "val_manifest": Path(write_table(val, "manifest", out / "sft_val.parquet").path),
        }
        info = {
            "train": {"good": int((train.label == 0).sum()), "defect": int((train.label == 1).sum())},
            "val": {"good": int((val.label == 0).sum()), "defect": int((val.label == 1).sum())},
            "defect_train_ratio": cfg.defect_train_ratio,
            "seed": cfg.seed,
        }
        return files, info

    return run_stage(store, "sft", ["saec.prompts"], dict(scan=scan, cfg=cfg), build)
