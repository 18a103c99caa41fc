"""Dataset preparation: read the source folders, build the MVTec AD binary holdout and the
KolektorSDD2 1:1 set, and prove that the holdout shares no image with the SFT train split.

Plain functions; the Prefect task wrappers are at the bottom.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from prefect import task
from prefect.cache_policies import NO_CACHE

from saec.artifacts.hashing import hash_followed_tree, sha256_file
from saec.artifacts.store import StageResult, Store, published_path, write_json_atomic, write_table
from saec.datasets.images import DEFAULT_MAX_PIXELS
from saec.datasets.ksdd2 import read_ksdd2
from saec.datasets.mvtec import read_mvtec
from saec.tasks.stage import Built, DatasetRef, stage
from saec.errors import ActionableError

MANIFEST_COLS = ["image_id", "path", "source_path", "label", "category", "defect_type", "split", "width", "height", "mode"]


class LeakageError(ActionableError, RuntimeError):
    """An evaluation image is also a training image."""


class HoldoutError(ActionableError, ValueError):
    """The holdout cannot be drawn from the test split as it is."""


class HoldoutConfig(BaseModel):
    """The MVTec AD binary holdout, drawn from `test/` only (seed: 500 + 500, seed 2025).

    `balance` says what happens when `test/` (less the SFT training images) holds fewer images of
    a class than asked: "cap_to_smaller" (the default) shrinks both classes by the same factor, so
    the holdout keeps the asked ratio (1:1 for the published run's 500 + 500) and its accuracy stays
    comparable with the published run's, which is measured on equal classes; "as_available" takes what
    there is of each class, and accuracy then leans toward the larger class (balanced accuracy is
    reported either way). Either way the run warns and every report states the counts.
    """

    model_config = ConfigDict(extra="forbid")
    n_good: int = Field(500, ge=1)
    n_defect: int = Field(500, ge=1)
    balance: Literal["cap_to_smaller", "as_available"] = "cap_to_smaller"
    seed: int = 2025
    link: Literal["symlink", "copy"] = "symlink"


class KSDD2Config(BaseModel):
    """KolektorSDD2 balanced set: every defect image plus as many goods drawn at random."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 1234
    link: Literal["symlink", "copy"] = "symlink"


class ScanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="images larger than this are quarantined")


# --------------------------------------------------------------------------- plain functions


def fingerprint(root: str | Path, kind: str) -> DatasetRef:
    """Content hash of a dataset folder as the readers see it (the scan stages' cache key).

    The readers follow links, so the hash does too (`hash_followed_tree`): every file's
    relative path and the bytes read through any links, where a linked file resolves to
    (inside the root, or outside it), and every broken link and link loop. Editing a file
    inside a symlinked category, or creating, fixing or removing a broken link, changes it.
    For a tree of regular files it is `hash_tree`'s hash.
    """
    root = Path(root).resolve()
    sha256, files = hash_followed_tree(root)
    return DatasetRef(kind=kind, path=str(root), sha256=sha256, files=files)


def _place(src: Path, dst: Path, link: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


def _materialise(rows: pd.DataFrame, out_dir: Path, names: pd.Series, link: str, split: str) -> pd.DataFrame:
    """Link or copy each row's source file into out_dir/val/{good,defect}/<name>; return the manifest."""
    paths = []
    (out_dir / "val").mkdir(parents=True, exist_ok=True)
    for src, label, name in zip(rows.path, rows.label, names):
        dst = out_dir / "val" / ("defect" if label else "good") / name
        _place(Path(src), dst, link)
        paths.append(str(published_path(dst)))
    man = rows.rename(columns={"path": "source_path"}).assign(path=paths, split=split)
    return man[MANIFEST_COLS].reset_index(drop=True)


def build_holdout(
    images: pd.DataFrame, sft_train_ids: set[str], cfg: HoldoutConfig, out_dir: Path
) -> tuple[pd.DataFrame, dict]:
    """Draw the binary holdout from the MVTec `test/` split, never taking an SFT training image.

    Both pools are shuffled by one seeded generator and the first n of each are taken.
    """
    test = images[(images.split == "test")].sort_values("rel_path", kind="stable")
    excluded = test.image_id.isin(sft_train_ids)
    pool = test[~excluded]
    rng = np.random.default_rng(cfg.seed)
    good = pool[pool.label == 0]
    defect = pool[pool.label == 1]
    available = {"good": int(len(good)), "defect": int(len(defect))}
    missing = [k for k, v in available.items() if not v]
    if missing:
        raise HoldoutError(f"the MVTec test/ folders (less the SFT training images) hold no {' and no '.join(missing)} "
                           "images: the holdout needs both classes; add test/good images, or defect images "
                           "(lower sft.defect_train_ratio to keep more defects out of training)")
    n_good, n_defect = holdout_counts(cfg, available["good"], available["defect"])
    good = good.iloc[rng.permutation(len(good))[:n_good]]
    defect = defect.iloc[rng.permutation(len(defect))[:n_defect]]
    chosen = pd.concat([good, defect])
    names = np.where(
        chosen.label == 0,
        chosen.category + "__" + chosen.path.map(lambda p: Path(p).name),
        chosen.category + "__" + chosen.defect_type + "__" + chosen.path.map(lambda p: Path(p).name),
    )
    manifest = _materialise(chosen, out_dir, pd.Series(names, index=chosen.index), cfg.link, "holdout")
    check_disjoint(manifest, sft_train_ids, what="holdout")
    info = {
        "requested": {"good": cfg.n_good, "defect": cfg.n_defect},
        "actual": {"good": int(len(good)), "defect": int(len(defect))},
        "available": available,
        "balance": cfg.balance,
        "excluded_sft_train": int(excluded.sum()),
        "seed": cfg.seed,
    }
    if available["good"] < cfg.n_good or available["defect"] < cfg.n_defect:
        info["shortfall"] = (
            f"asked for {cfg.n_good} good + {cfg.n_defect} defect; test/ less the SFT training images holds "
            f"{available['good']} + {available['defect']}; holdout.balance={cfg.balance} took "
            f"{len(good)} + {len(defect)}"
        )
    return manifest, info


def holdout_counts(cfg: HoldoutConfig, good: int, defect: int) -> tuple[int, int]:
    """(goods, defects) the holdout takes when `good` and `defect` images are available."""
    if cfg.balance == "as_available":
        return min(cfg.n_good, good), min(cfg.n_defect, defect)
    factor = min(1.0, good / cfg.n_good, defect / cfg.n_defect)
    return min(good, int(cfg.n_good * factor + 1e-9)), min(defect, int(cfg.n_defect * factor + 1e-9))


def build_ksdd2_balanced(images: pd.DataFrame, cfg: KSDD2Config, out_dir: Path) -> tuple[pd.DataFrame, dict]:
    """All defect images and an equal number of good ones drawn at random, from train and test."""
    images = images.sort_values("rel_path", kind="stable")
    defect = images[images.label == 1]
    goods = images[images.label == 0]
    rng = np.random.default_rng(cfg.seed)
    good = goods.iloc[np.sort(rng.permutation(len(goods))[: len(defect)])]
    chosen = pd.concat([good, defect])
    names = chosen.split + "__" + chosen.path.map(lambda p: Path(p).name)
    manifest = _materialise(chosen, out_dir, names, cfg.link, "ksdd2_1to1")
    for label, fname in ((0, "ksdd2_1to1_good.txt"), (1, "ksdd2_1to1_defect.txt")):
        lines = [Path(p).name for p in manifest.path[manifest.label == label]]
        (out_dir / fname).write_text("".join(f"{n}\n" for n in lines))
    info = {"defect": int(len(defect)), "good": int(len(good)), "good_available": int(len(goods)), "seed": cfg.seed}
    if len(goods) < len(defect):
        info["shortfall"] = f"only {len(goods)} good images for {len(defect)} defects: the set is not 1:1"
    return manifest, info


def check_disjoint(manifest: pd.DataFrame, train_ids: set[str], what: str) -> None:
    """Fail if any image of `manifest` has the content hash of a training image."""
    overlap = manifest[manifest.image_id.isin(train_ids)]
    if len(overlap):
        shown = "\n".join(f"  {p} (sha256 {i[:12]})" for p, i in zip(overlap.path[:10], overlap.image_id[:10]))
        raise LeakageError(
            f"{len(overlap)} {what} image(s) are also in the SFT train split, so the evaluation would "
            f"score images the models trained on:\n{shown}\n"
            f"Remove them from the {what}, or rebuild it with `saec prepare` (the builder excludes SFT "
            f"train images by content hash)."
        )


def verify_holdout_files(holdout: StageResult, train_ids: set[str]) -> dict:
    """Hash the files actually present in the built holdout and check them against the SFT train split.

    The manifest alone is not trusted: a file dropped into `val/` by hand is caught too.
    """
    val = Path(holdout.dir) / "val"
    files = [p for p in sorted(val.rglob("*")) if p.is_file()]
    ids = [sha256_file(p) for p in files]
    present = pd.DataFrame({"path": [str(p) for p in files], "image_id": ids})
    check_disjoint(present, train_ids, what="holdout")
    return {"files_checked": len(files)}


# --------------------------------------------------------------------------- stages


def _scan_outputs(result, out_dir: Path, store: str) -> Built:
    # with an object store, the accepted images go there by content: workers elsewhere read them from it
    Store(store).share_files(result.images["path"], result.images["image_id"])
    images = write_table(result.images, "source_images", out_dir / "images.parquet")
    quarantine = write_table(result.quarantine, "quarantine", out_dir / "quarantine.parquet")
    return {"images": Path(images.path), "quarantine": Path(quarantine.path)}, {"counts": result.counts()}


@stage("scan_mvtec", task="scan-mvtec")
def scan_mvtec(out: Path, store: str, source: DatasetRef, cfg: ScanConfig) -> Built:
    """Read and validate every file of an MVTec AD folder."""
    return _scan_outputs(read_mvtec(source.path, cfg.max_pixels, progress=True), out, store)


@stage("scan_ksdd2", task="scan-ksdd2")
def scan_ksdd2(out: Path, store: str, source: DatasetRef, cfg: ScanConfig) -> Built:
    """Read and validate every file of a KolektorSDD2 folder; masks decide labels."""
    return _scan_outputs(read_ksdd2(source.path, cfg.max_pixels, progress=True), out, store)


def _manifest_outputs(manifest: pd.DataFrame, info: dict, out_dir: Path, extra: dict | None = None) -> Built:
    ref = write_table(manifest, "manifest", out_dir / "manifest.parquet")
    write_json_atomic(out_dir / "manifest.json", info | {"rows": len(manifest)})
    files = {"manifest": Path(ref.path), "summary": out_dir / "manifest.json", "files": out_dir / "val"}
    return files | (extra or {}), info


@stage("holdout", task="build-holdout")
def holdout_task(out: Path, scan: StageResult, sft: StageResult, cfg: HoldoutConfig) -> Built:
    """The MVTec AD binary holdout (val/good, val/defect), disjoint from the SFT train split."""
    train_ids = set(sft.table("train_manifest").image_id)
    manifest, info = build_holdout(scan.table("images"), train_ids, cfg, out)
    return _manifest_outputs(manifest, info, out)


@stage("ksdd2_1to1", task="build-ksdd2-1to1")
def ksdd2_task(out: Path, scan: StageResult, cfg: KSDD2Config) -> Built:
    """The KolektorSDD2 1:1 set with its split lists."""
    manifest, info = build_ksdd2_balanced(scan.table("images"), cfg, out)
    lists = {"good_list": out / "ksdd2_1to1_good.txt", "defect_list": out / "ksdd2_1to1_defect.txt"}
    return _manifest_outputs(manifest, info, out, lists)


@task(name="check-leakage", cache_policy=NO_CACHE, persist_result=False)
def leakage_task(holdout: StageResult, sft: StageResult) -> dict:
    """Not cached on purpose: re-hashes the holdout files on every run."""
    train_ids = set(sft.table("train_manifest").image_id)
    check_disjoint(holdout.table("manifest"), train_ids, what="holdout")
    return verify_holdout_files(holdout, train_ids)
