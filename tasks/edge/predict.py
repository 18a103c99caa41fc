"""Edge inference from image files to per-image measures and verdicts, as a Parquet table.

The loop is: worker threads decode and preprocess the next batches while the runtime
(ONNX Runtime, or PyTorch) runs the current one; logits become measures and verdicts per
batch with vectorised numpy. One row per input image, in input order.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from saec.artifacts.schemas import source_paths
from saec.artifacts.store import read_paths, write_table
from saec.tasks.edge.config import EdgeConfig, Thresholds
from saec.tasks.edge.measures import rule_verdict, softmax_measures, thresholds_from_measures
from saec.tasks.edge.model import EdgeModel, EdgeModelError, LoadedModel
from saec.tasks.edge.runtime import make_runner, read_onnx_meta
from saec.tasks.edge.preprocess import iter_batches, to_nchw_float

EDGE_COLUMNS = [
    "image_id", "path", "source_path", "p_defect", "smax", "margin", "entropy", "top1_class", "top1_name", "verdict",
    "mode", "runtime", "model_id", "imgsz", "batch_index", "batch_seconds", "wait_seconds",
]
DEFECT = "defect"
GOOD = "good"


def _progress(enabled: bool, total: int, description: str) -> tqdm:
    return tqdm(total=total, desc=description, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


def _empty_measures() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "p_defect": pd.Series(dtype="float64"),
            "smax": pd.Series(dtype="float64"),
            "margin": pd.Series(dtype="float64"),
            "entropy": pd.Series(dtype="float64"),
            "top1_class": pd.Series(dtype="int32"),
            "top1_name": pd.Series(dtype="object"),
            "batch_index": pd.Series(dtype="int32"),
            "batch_seconds": pd.Series(dtype="float64"),
            "wait_seconds": pd.Series(dtype="float64"),
        }
    )


def _check_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("image_id", "path") if c not in manifest.columns]
    if missing:
        raise ValueError(f"the edge stage needs manifest columns image_id and path; missing {missing}")
    if manifest["path"].isna().any():
        raise ValueError("the manifest has rows without a path")
    kept = ["image_id", "path", *(["read_path"] if "read_path" in manifest.columns else [])]  # where this machine reads
    return manifest[kept].assign(source_path=source_paths(manifest)).reset_index(drop=True)


def defect_index(names: dict[int, str]) -> int:
    """Index of the class named 'defect' in a two-class (good/defect) model."""
    by_name = {v: k for k, v in names.items()}
    if set(by_name) != {GOOD, DEFECT}:
        raise EdgeModelError(
            f"the supervised edge needs a two-class model with classes 'good' and 'defect'; this one has "
            f"{sorted(by_name)[:10]}{' ...' if len(by_name) > 10 else ''} (train it with train_edge first)"
        )
    return by_name[DEFECT]


def resolve_model(cfg: EdgeConfig, weights: str | Path | None = None) -> EdgeModel:
    """The model the config names, or `weights` (a trained model.json) when given."""
    return EdgeModel(weights if weights is not None else cfg.weights, seed=cfg.seed)


def int8_calibration_sample(cfg: EdgeConfig, paths: Sequence[str]) -> list[str]:
    """The images int8 ranges are calibrated on by default: a sample of `paths` seeded by
    `cfg.seed`, in their order (no labels are involved)."""
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(paths), size=min(cfg.int8_calibration_images, len(paths)), replace=False)
    return [paths[i] for i in sorted(pick)]


def run_edge(
    cfg: EdgeConfig,
    paths: list[str],
    cache_dir: str | Path,
    model: EdgeModel | LoadedModel | None = None,
    description: str = "edge",
    calibration: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Measures of every image in `paths` (in order) and run information; no verdicts yet.

    With precision=int8, `calibration` names the images the quantization ranges come from;
    by default a seeded sample of `paths` (no labels are involved).
    """
    model = EdgeModel.of(model) if model is not None else resolve_model(cfg)
    if cfg.precision == "int8" and not paths and not calibration:
        cfg = cfg.model_copy(update={"precision": "fp32"})  # nothing to classify, nothing to calibrate on
    calibration_source = None
    if cfg.precision == "int8":
        calibration_source = "given" if calibration else "sample of the input images"
        if not calibration:
            calibration = int8_calibration_sample(cfg, paths)
    runner, class_names, fallback_reason = make_runner(cfg, model, cache_dir, calibration)
    d_idx = defect_index(class_names) if cfg.mode == "supervised" else None  # before any image is read
    num_classes = len(class_names)
    names = np.array([class_names[i] for i in range(num_classes)], dtype=object)
    n = len(paths)
    parts: list[pd.DataFrame] = []
    infer_s = wait_s = 0.0
    t0 = tw = time.perf_counter()
    with _progress(cfg.progress and n > cfg.batch_size, n, f"{description} ({runner.name}, {cfg.imgsz}px)") as bar:
        batches = iter_batches(paths, cfg.imgsz, cfg.batch_size, cfg.resolved_io_threads(), cfg.prefetch_batches)
        for b, (start, stop, batch) in enumerate(batches):
            x = to_nchw_float(batch)
            tb = time.perf_counter()
            waited = tb - tw
            logits = runner(x)
            tw = time.perf_counter()
            dt = tw - tb
            infer_s += dt
            wait_s += waited
            if logits.shape != (stop - start, num_classes):
                raise EdgeModelError(f"the model returned logits of shape {logits.shape} for a batch of {stop - start}")
            m = softmax_measures(logits)
            parts.append(
                pd.DataFrame(
                    {
                        "p_defect": m.probs[:, d_idx] if d_idx is not None else np.full(stop - start, np.nan),
                        "smax": m.smax,
                        "margin": m.margin,
                        "entropy": m.entropy,
                        "top1_class": m.top1.astype(np.int32),
                        "top1_name": names[m.top1],
                        "batch_index": np.int32(b),
                        "batch_seconds": dt,
                        "wait_seconds": waited,
                    }
                )
            )
            bar.update(stop - start)
    wall = time.perf_counter() - t0
    df = pd.concat(parts, ignore_index=True) if parts else _empty_measures()
    info = {
        "n_images": n,
        "runtime": runner.name,
        "runtime_fallback_reason": fallback_reason,
        "model_id": model.model_id,
        "weights": model.weights,
        "num_classes": num_classes,
        "imgsz": cfg.imgsz,
        "batch_size": cfg.batch_size,
        "threads": cfg.resolved_threads(),
        "io_threads": cfg.resolved_io_threads(),
        "wall_seconds": round(wall, 4),
        "inference_seconds": round(infer_s, 4),
        "wait_seconds": round(wait_s, 4),
        "images_per_second": round(n / wall, 3) if wall > 0 else None,
    }
    if hasattr(runner, "onnx_path"):
        info["onnx_path"] = str(runner.onnx_path)
    if cfg.precision == "int8" and runner.name.endswith("int8"):
        meta = read_onnx_meta(runner.onnx_path)
        info["int8"] = {"calibration": calibration_source, **meta["verification_vs_fp32"]}
    return df, info


def calibrate_thresholds(
    cfg: EdgeConfig,
    good: pd.DataFrame | list[str],
    cache_dir: str | Path,
    weights: str | Path | None = None,
) -> Thresholds:
    """The published run's default thresholds: quantiles of smax, margin, entropy over train/good images.

    `good` is a manifest (column `path`) or a list of paths of good images. Thresholds the
    config sets explicitly are kept; only the ones set to None are calibrated.
    """
    paths = read_paths(good) if isinstance(good, pd.DataFrame) else [str(p) for p in good]
    if not paths:
        raise ValueError("calibrate_thresholds needs at least one train/good image")
    model = resolve_model(cfg, weights)
    df, _ = run_edge(cfg, paths, cache_dir, model=model, description="edge calibration")
    return thresholds_from_measures(df.smax, df.margin, df.entropy, cfg.calibration_quantiles, cfg=cfg)


def predict_edge(
    cfg: EdgeConfig,
    manifest: pd.DataFrame,
    out_path: str | Path,
    cache_dir: str | Path,
    weights: str | Path | None = None,
    thresholds: Thresholds | None = None,
    int8_calibration: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Classify every image of `manifest` (columns image_id, path; source_path where it has one) and
    write `edge_predictions` Parquet.

    imagenet_rule: verdict = the published run's rule with `thresholds` (or the config's, when all three
    are set); p_defect is null. supervised: `weights` is the trained model.json (default: the
    config's weights, which must then be a good/defect model); verdict = p_defect >=
    cfg.defect_threshold. With precision=int8, `int8_calibration` are the images the
    quantization is calibrated on (default: a seeded sample of the manifest's images).
    Returns run information (counts, runtime, speed, thresholds).
    """
    manifest = _check_manifest(manifest)
    thresholds = thresholds or cfg.config_thresholds()
    if cfg.mode == "imagenet_rule":
        if thresholds is None:
            raise ValueError(
                "edge thresholds are set to be calibrated (None in the config): run calibrate_thresholds on "
                "train/good images first and pass its result as `thresholds`"
            )
    model = resolve_model(cfg, weights)
    df, info = run_edge(cfg, read_paths(manifest), cache_dir, model=model, calibration=int8_calibration)
    if cfg.mode == "imagenet_rule":
        verdict = rule_verdict(df.smax.to_numpy(), df.margin.to_numpy(), df.entropy.to_numpy(), thresholds)
    else:
        verdict = (df.p_defect.to_numpy() >= cfg.defect_threshold).astype(np.int8)
    df.insert(0, "image_id", manifest["image_id"].astype(str))
    df.insert(1, "path", manifest["path"].astype(str))
    df.insert(2, "source_path", manifest["source_path"])
    df = df.assign(
        verdict=verdict,
        mode=cfg.mode,
        runtime=info["runtime"],
        model_id=model.model_id,
        imgsz=np.int32(cfg.imgsz),
    )[EDGE_COLUMNS]
    ref = write_table(df, "edge_predictions", out_path)
    info |= {
        "mode": cfg.mode,
        "out_path": ref.path,
        "sha256": ref.sha256,
        "rows": ref.rows,
        "defect_verdicts": int(verdict.sum()),
        "thresholds": thresholds.model_dump() if thresholds is not None else None,
        "defect_threshold": cfg.defect_threshold if cfg.mode == "supervised" else None,
    }
    return info
