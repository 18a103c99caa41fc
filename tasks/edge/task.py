"""Prefect tasks of the edge branch: train the two-class classifier, classify images (measured)."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from saec.artifacts.schemas import empty_table
from saec.artifacts.store import StageResult, write_json_atomic, write_table
from saec.tasks.edge.config import EdgeConfig
from saec.tasks.stage import STAGE_TASK, run_stage, stage_cache_key
from saec.tasks.telemetry import TelemetryConfig, measure

RUNTIME = ["saec.tasks.edge.config", "saec.tasks.edge.model", "saec.tasks.edge.measures",
           "saec.tasks.edge.preprocess", "saec.tasks.edge.predict"]  # fmt: skip
TRAIN = [*RUNTIME, "saec.tasks.edge.train"]


@task(name="train-edge", cache_key_fn=stage_cache_key("train_edge", TRAIN), **STAGE_TASK)
def train_edge_task(store: str, sft: StageResult, cfg: EdgeConfig) -> StageResult:
    """The supervised good/defect YOLO11-cls, trained on the SFT train split."""
    from saec.tasks.edge.train import train_edge

    def build(out: Path, work: Path):
        info = train_edge(cfg, sft.path("train_jsonl"), sft.path("val_jsonl"), work, out)
        files = {"weights": out / "best.pt", "summary": write_json_atomic(out / "train_summary.json", info)}
        return files, {k: v for k, v in info.items() if isinstance(v, (int, float, str, dict, list, type(None)))}

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
        weights = trained.path("weights") if trained is not None else None
        if len(manifest) == 0:
            ref = write_table(empty_table("edge_predictions"), "edge_predictions", out / "predictions.parquet")
            return {"predictions": Path(ref.path)}, {"images": 0, "seconds": 0.0, "label": label}
        cache = Path(store) / "cache" / "edge"

        def run():
            thresholds = None
            if cfg.mode == "imagenet_rule" and cfg.needs_calibration:
                train = sft.table("train_manifest")
                thresholds = calibrate_thresholds(cfg, train[train.label == 0], cache, weights)
            return predict_edge(cfg, manifest, out / "predictions.parquet", cache, weights, thresholds)

        info, summary, samples = measure(run, telemetry)
        write_table(samples, "telemetry", out / "telemetry.parquet")
        files = {"predictions": out / "predictions.parquet", "telemetry": out / "telemetry.parquet"}
        keep = {k: v for k, v in info.items() if isinstance(v, (int, float, str, dict, list, type(None)))}
        return files, {"images": len(manifest), "seconds": summary["wall_s"], "telemetry": summary, "label": label,
                       "run": keep}  # fmt: skip

    return run_stage(store, "predict_edge", RUNTIME, dict(images=images, table=table, trained=trained, sft=sft, cfg=cfg), build)
