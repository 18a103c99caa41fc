"""Training the supervised edge: a two-class (good/defect) YOLO11-cls on the SFT split.

The SFT JSONL files are laid out as the ImageFolder Ultralytics' classification trainer
reads (``train/{good,defect}``, ``val/{good,defect}``, symlinks named by image id), and
the trainer runs on the CPU, seeded and deterministic. The class folders sort as
``defect`` (0), ``good`` (1); the saved model's `names` say so and inference looks the
defect index up by name, never by position. The trained model is kept without pickle
(model.safetensors and model.json, see `saec.tasks.edge.model.save_classifier`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from saec.artifacts.store import atomic_path
from saec.datasets.images import load_image
from saec.tasks.edge.config import EdgeConfig, is_saved_model
from saec.tasks.edge.model import SAVED_MODEL, SAVED_WEIGHTS, EdgeModelError, load_saved, save_classifier, ultralytics
from saec.tasks.edge.predict import defect_index

CLASS_DIRS = {0: "good", 1: "defect"}


def read_sft_jsonl(path: str | Path) -> pd.DataFrame:
    """(image_id, path, label) of every example of an SFT JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT file {path} does not exist")
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rows.append({"image_id": str(rec["image_id"]), "path": str(rec["image"]), "label": int(rec["label"])})
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not an SFT record with image_id, image, label ({exc})") from None
    df = pd.DataFrame(rows, columns=["image_id", "path", "label"])
    bad = df[~df.label.isin([0, 1])]
    if len(bad):
        raise ValueError(f"{path}: labels must be 0 or 1; found {sorted(bad.label.unique())}")
    return df


# OpenCV, which Ultralytics' trainer reads images with, decodes these suffixes in every variant the
# scan accepts except TIFF: a TIFF of 32-bit or floating-point samples it cannot read at all.
_OPENCV_MAY_FAIL = frozenset({".tif", ".tiff"})


def _place(src: Path, stem: Path) -> Path:
    """`stem` + suffix in the image folder: a link to `src`, or, where OpenCV cannot decode `src`,
    an 8-bit PNG of it made by the project's reader (which the scan has already read it with)."""
    suffix = src.suffix.lower()
    if suffix in _OPENCV_MAY_FAIL:
        import cv2
        import numpy as np

        if cv2.imdecode(np.fromfile(src, dtype=np.uint8), cv2.IMREAD_COLOR) is None:
            dst = stem.with_name(stem.name + ".png")
            load_image(src, "RGB").save(dst)
            return dst
    dst = stem.with_name(stem.name + suffix)
    os.symlink(src.resolve(), dst)
    return dst


def build_imagefolder(
    train: pd.DataFrame, val: pd.DataFrame, root: str | Path, balance: bool = True
) -> dict[str, dict[str, int]]:
    """Symlink the images into root/{train,val}/{good,defect}/<image_id><suffix>; return the counts.

    An image OpenCV cannot decode (a floating-point TIFF) is written there as an 8-bit PNG instead.

    With `balance`, the smaller class of the train split is oversampled by extra links
    (``<image_id>~<k><suffix>``) until both classes have the same number of entries, so the
    trainer sees as many defects as goods per epoch. Fails when a split lacks a class, an
    image is missing, or an image is in both splits.
    """
    root = Path(root)
    leaked = sorted(set(train.image_id) & set(val.image_id))
    if leaked:
        raise ValueError(f"{len(leaked)} images are in both the SFT train and val files (e.g. {leaked[0]})")
    if root.exists():
        shutil.rmtree(root)
    counts: dict[str, dict[str, int]] = {}
    for split, df in (("train", train), ("val", val)):
        df = df.drop_duplicates("image_id")
        missing = [p for p in df.path if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} SFT {split} images do not exist, e.g. {missing[0]}")
        counts[split] = {}
        for label, cls in CLASS_DIRS.items():
            rows = df[df.label == label]
            if rows.empty:
                raise ValueError(f"the SFT {split} split has no {cls!r} images; the edge classifier needs both classes")
            folder = root / split / cls
            folder.mkdir(parents=True)
            for image_id, src in zip(rows.image_id, rows.path):
                _place(Path(src), folder / image_id)
            counts[split][cls] = len(rows)
        if balance and split == "train":
            target = max(counts[split].values())
            for label, cls in CLASS_DIRS.items():
                rows = df[df.label == label]
                for k in range(target - len(rows)):  # whole passes over the class, then a prefix
                    image_id, src = rows.image_id.iloc[k % len(rows)], rows.path.iloc[k % len(rows)]
                    _place(Path(src), root / split / cls / f"{image_id}~{k // len(rows) + 1}")
                counts[split][f"{cls}_oversampled"] = target - len(rows)
    return counts


def train_edge(
    cfg: EdgeConfig,
    train_jsonl: str | Path,
    val_jsonl: str | Path,
    work_dir: str | Path,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Train the two-class edge classifier; write out_dir/model.json, out_dir/model.safetensors and
    out_dir/train_results.csv.

    From the config's .yaml the model starts from seeded random weights (the embedded
    default); from a .pt checkpoint it is fine-tuned (Ultralytics replaces its head with a
    two-class one). The saved model is the checkpoint `cfg.train.checkpoint` names: by
    default the last epoch's, because the SFT val split Ultralytics would select on holds
    the same images as the MVTec holdout. Returns the model's paths, model id, class names,
    validation top-1 accuracy per epoch and timings.
    """
    if cfg.mode != "supervised":
        raise ValueError(f"train_edge is for edge.mode=supervised, not {cfg.mode!r}")
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    train, val = read_sft_jsonl(train_jsonl), read_sft_jsonl(val_jsonl)
    counts = build_imagefolder(train, val, work_dir / "imagefolder", balance=cfg.train.balance_classes)

    ul = ultralytics()
    threads = cfg.resolved_threads()
    with _process_settings_kept():
        return _train(cfg, ul, threads, work_dir, out_dir, counts)


# What Ultralytics' trainer changes for the whole process and leaves changed: it sets torch to its
# own thread count (cores - 1: one on two cores) and, for determinism, CUBLAS_WORKSPACE_CONFIG and the
# deterministic-algorithms flag. A stage after it in the same process (the cloud model's training)
# would otherwise run on one core. (OMP_NUM_THREADS=1, which Ultralytics sets on import when unset,
# is kept from taking effect by saec.env.configure_offline.)
_PROCESS_ENV = ("OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")


@contextmanager
def _process_settings_kept():
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    env = {k: os.environ.get(k) for k in _PROCESS_ENV}
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _progress(yolo, epochs: int, show: bool):
    """A terminal bar over the batches of an Ultralytics run (its own printing is off), so that a long
    epoch on real images shows it moving: the epoch, the training images/s so far in it, and after
    each epoch its mean training loss and the validation accuracy."""
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs, desc="edge training", unit="batch", disable=not show, dynamic_ncols=True)
    started = {"t": time.perf_counter(), "batches": 0}
    stats: dict[str, str] = {}

    def train_start(trainer) -> None:  # the loader exists now: count the bar in batches
        loader = getattr(trainer, "train_loader", None)
        if loader is not None and len(loader):
            bar.reset(total=epochs * len(loader))

    def epoch_start(trainer) -> None:
        started.update(t=time.perf_counter(), batches=0)
        stats["epoch"] = f"{getattr(trainer, 'epoch', 0) + 1}/{epochs}"

    def batch_end(trainer) -> None:
        started["batches"] += 1
        seconds = time.perf_counter() - started["t"]
        if seconds > 0:
            stats["img_s"] = f"{started['batches'] * getattr(trainer, 'batch_size', 0) / seconds:.1f}"
        bar.update(1)
        bar.set_postfix(stats, refresh=False)

    def epoch_end(trainer) -> None:  # after the training batches, before validation
        loss = getattr(trainer, "tloss", None)  # a tensor, or {name: value} in newer Ultralytics
        if isinstance(loss, dict):
            loss = sum(float(v) for v in loss.values())
        if loss is not None:
            stats["loss"] = f"{float(loss.mean() if hasattr(loss, 'mean') else loss):.4f}"
        loader = getattr(trainer, "train_loader", None)
        seconds = time.perf_counter() - started["t"]
        if loader is not None and seconds > 0:
            stats["img_s"] = f"{len(loader.dataset) / seconds:.1f}"

    def fit_end(trainer) -> None:  # after validation
        top1 = (getattr(trainer, "metrics", None) or {}).get("metrics/accuracy_top1")
        if top1 is not None:
            stats["val_acc"] = f"{100 * float(top1):.1f}%"
        bar.set_postfix(stats)

    yolo.add_callback("on_train_start", train_start)
    yolo.add_callback("on_train_epoch_start", epoch_start)
    yolo.add_callback("on_train_batch_end", batch_end)
    yolo.add_callback("on_train_epoch_end", epoch_end)
    yolo.add_callback("on_fit_epoch_end", fit_end)
    return bar


def _starting_model(ul, weights: str):
    """The Ultralytics model training starts from: built from a .yaml (random), a user's .pt
    checkpoint, or a saved model.json (rebuilt from its definition with its safetensors weights,
    head included, so nothing is unpickled)."""
    if not is_saved_model(weights):
        return ul.YOLO(weights, task="classify")
    net = load_saved(weights)
    yolo = ul.YOLO(net.yaml["yaml_file"], task="classify")  # the wrapper; its module is replaced
    yolo.model = net
    return yolo.load(net)  # Ultralytics' object load: training seeds from these weights


def _train(cfg: EdgeConfig, ul, threads: int, work_dir: Path, out_dir: Path, counts: dict) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    t = cfg.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        yolo = _starting_model(ul, cfg.weights)
    bar = _progress(yolo, t.epochs, cfg.progress)
    t0 = time.perf_counter()
    try:
        metrics = yolo.train(
            data=str(work_dir / "imagefolder"),
            epochs=t.epochs,
            imgsz=cfg.imgsz,
            batch=t.batch,
            device="cpu",
            workers=t.workers,
            project=str(work_dir),
            name="run",
            exist_ok=True,
            seed=t.seed,
            deterministic=True,
            pretrained=not cfg.from_yaml,
            amp=False,
            plots=False,
            verbose=False,
            **{k: v for k, v in t.ultralytics_args().items() if k not in ("epochs", "batch", "workers", "seed")},
        )
    except Exception as exc:  # noqa: BLE001 - name the stage and the data it failed on
        folder = work_dir / "imagefolder"
        raise EdgeModelError(f"edge training failed on {folder}: {type(exc).__name__}: {exc}") from exc
    finally:
        bar.close()
    train_s = time.perf_counter() - t0

    run_dir = Path(yolo.trainer.save_dir)
    chosen = run_dir / "weights" / f"{t.checkpoint}.pt"
    if not chosen.is_file():
        raise EdgeModelError(f"Ultralytics finished without writing {chosen}")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:  # the run's checkpoint is a pickle this process just wrote: read once, kept without pickle
        trained = ul.YOLO(str(chosen), task="classify").model
    except Exception as exc:  # noqa: BLE001 - name the file
        raise EdgeModelError(f"cannot read the trained checkpoint {chosen}: {type(exc).__name__}: {exc}") from exc
    loaded = save_classifier(trained, cfg.imgsz, out_dir)  # loaded back from the saved files
    defect_index(loaded.names)
    results_csv = run_dir / "results.csv"
    if results_csv.is_file():
        with atomic_path(out_dir / "train_results.csv") as tmp:
            shutil.copyfile(results_csv, tmp)
    history = pd.read_csv(results_csv) if results_csv.is_file() else pd.DataFrame()
    history.columns = [c.strip() for c in history.columns]
    by_epoch = [float(x) for x in history.get("metrics/accuracy_top1", [])]
    if t.checkpoint == "best":
        val_top1 = float(getattr(metrics, "top1", float("nan"))) if metrics is not None else None
    else:
        val_top1 = by_epoch[-1] if by_epoch else None
    return {
        "model": str((out_dir / SAVED_MODEL).resolve()),
        "weights": str((out_dir / SAVED_WEIGHTS).resolve()),
        "results_csv": str((out_dir / "train_results.csv").resolve()) if results_csv.is_file() else None,
        "model_id": loaded.model_id,
        "names": {str(k): v for k, v in loaded.names.items()},
        "counts": counts,
        "epochs_run": int(len(history)),
        "checkpoint": t.checkpoint,
        "val_top1": val_top1,
        "val_top1_by_epoch": by_epoch,
        "train_seconds": round(train_s, 2),
        "imgsz": cfg.imgsz,
        "base_weights": cfg.weights,
        "threads": threads,
    }
