"""Stages of the edge branch: train the two-class classifier, classify images (measured)."""
from __future__ import annotations

from pathlib import Path

from saec.artifacts.store import StageResult, readable_jsonl, with_read_paths, write_json_atomic
from saec.tasks.edge.config import EdgeConfig
from saec.tasks.stage import Built, stage
from saec.tasks.telemetry import TelemetryConfig, jsonable, measured_stage


@stage("train_edge", task="train-edge", work_dir=True, measurements=("summary", "results_csv"))
def train_edge_task(out: Path, work: Path, store: str, sft: StageResult, cfg: EdgeConfig) -> Built:
    """The supervised good/defect YOLO11-cls, trained on the SFT train split."""
    from saec.tasks.edge.train import train_edge

    train, val = (readable_jsonl(store, sft.path(name), work) for name in ("train_jsonl", "val_jsonl"))
    info = train_edge(cfg, train, val, work, out)
    files = {"weights": out / "model.safetensors", "model": out / "model.json",
             "summary": write_json_atomic(out / "train_summary.json", info)}  # fmt: skip
    if (out / "train_results.csv").is_file():
        files["results_csv"] = out / "train_results.csv"
    return files, jsonable(info)


@stage("predict_edge", task="predict-edge", observe=("telemetry", "label"))
def predict_edge_task(
    out: Path,
    store: str,
    images: StageResult,
    table: str,
    trained: StageResult | None,
    sft: StageResult,
    cfg: EdgeConfig,
    telemetry: TelemetryConfig,
    label: str = "",
) -> Built:
    """Edge verdicts and confidence measures for every image of `images.table(table)`, measured."""
    from saec.tasks.edge.predict import calibrate_thresholds, predict_edge

    manifest = with_read_paths(store, images.table(table))
    weights = trained.path("model") if trained is not None else None
    cache = Path(store) / "cache" / "edge"  # exported ONNX graphs, by model identity

    def compute():
        thresholds = None
        if cfg.mode == "imagenet_rule" and cfg.needs_calibration:
            train = sft.table("train_manifest")
            thresholds = calibrate_thresholds(cfg, with_read_paths(store, train[train.label == 0]), cache, weights)
        return predict_edge(cfg, manifest, out / "predictions.parquet", cache, weights, thresholds)

    return measured_stage(out, "predictions", "edge_predictions", len(manifest), compute, telemetry, label)
