"""Prefect tasks of the edge branch: train the two-class classifier, classify images (measured)."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from saec.artifacts.store import StageResult, write_json_atomic
from saec.tasks.edge.config import EdgeConfig
from saec.tasks.stage import STAGE_TASK, run_stage, stage_cache_key
from saec.tasks.telemetry import TelemetryConfig, jsonable, measured_stage

RUNTIME = ["saec.tasks.edge.config", "saec.tasks.edge.model", "saec.tasks.edge.measures",
           "saec.tasks.edge.preprocess", "saec.tasks.edge.predict"]  # fmt: skip
TRAIN = [*RUNTIME, "saec.tasks.edge.train"]


@task(name="train-edge", cache_key_fn=stage_cache_key("train_edge", TRAIN), **STAGE_TASK)
def train_edge_task(store: str, sft: StageResult, cfg: EdgeConfig) -> StageResult:
    """The supervised good/defect YOLO11-cls, trained on the SFT train split."""
    from saec.tasks.edge.train import train_edge

    def build(out: Path, work: Path):
        info = train_edge(cfg, sft.path("train_jsonl"), sft.path("val_jsonl"), work, out)
        files = {"weights": out / "model.safetensors", "model": out / "model.json",
                 "summary": write_json_atomic(out / "train_summary.json", info)}
        return files, jsonable(info)

    return run_stage(store, "train_edge", TRAIN, dict(sft=sft, cfg=cfg), build, work_dir=True)


@task(name="predict-edge", cache_key_fn=stage_cache_key("predict_edge", RUNTIME), **STAGE_TASK)
def predict_edge_task(
    store: str,
    images: StageResult,
    table: str,
    trained: StageResult | None,
    sft: StageResult,
    cfg: EdgeConfig,
    telemetry: TelemetryConfig,
    label: str = "",
) -> StageResult:
    """Edge verdicts and confidence measures for every image of `images.table(table)`, measured."""
    from saec.tasks.edge.predict import calibrate_thresholds, predict_edge

    def build(out: Path):
        manifest = images.table(table)
        weights = trained.path("model") if trained is not None else None
        cache = Path(store) / "cache" / "edge"

        def compute():
            thresholds = None
            if cfg.mode == "imagenet_rule" and cfg.needs_calibration:
                train = sft.table("train_manifest")
                thresholds = calibrate_thresholds(cfg, train[train.label == 0], cache, weights)
            return predict_edge(cfg, manifest, out / "predictions.parquet", cache, weights, thresholds)

        return measured_stage(out, "predictions", "edge_predictions", len(manifest), compute, telemetry, label)

    return run_stage(store, "predict_edge", RUNTIME, dict(images=images, table=table, trained=trained, sft=sft, cfg=cfg), build)
