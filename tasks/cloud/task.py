"""Prefect tasks of the cloud branch: build the embedded model, train, score.

The engine modules beside this one import neither Prefect nor Ultralytics (they run on
GPU machines without them); only this module binds them to the flow.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from prefect import task

from saec.artifacts.store import StageResult, write_json_atomic
from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig, TinyModelConfig
from saec.tasks.stage import STAGE_TASK, ModelRef, run_stage, stage_cache_key
from saec.tasks.telemetry import TelemetryConfig, jsonable, measured_stage

ENGINE = ["saec.tasks.cloud.engine", "saec.tasks.cloud.models", "saec.tasks.cloud.images", "saec.tasks.cloud.config"]
TRAIN = [*ENGINE, "saec.tasks.cloud.train"]


def model_ref(path: str | Path, kind: str = "vlm") -> ModelRef:
    """Reference a user's model folder by its identity (config and weight index hashes)."""
    from saec.tasks.cloud.models import model_identity, resolve_model_dir

    folder = resolve_model_dir(path)
    return ModelRef(kind=kind, path=str(folder), sha256=model_identity(folder))


def model_of(stage: StageResult) -> ModelRef:
    return ModelRef(kind=stage.stage, path=str(Path(stage.dir) / "model"), sha256=stage.digest())


@task(name="build-tiny-vlm", cache_key_fn=stage_cache_key("tiny_vlm", ["saec.tasks.cloud.tiny"]), **STAGE_TASK)
def tiny_vlm_task(store: str, cfg: TinyModelConfig) -> StageResult:
    """The embedded default cloud model: a tiny Qwen2.5-VL folder with random weights."""
    from saec.tasks.cloud.tiny import build_tiny_qwen

    def build(out: Path):
        folder = build_tiny_qwen(out / "model", cfg)
        return {"config": folder / "config.json"}, {"model_dir": "model"}

    return run_stage(store, "tiny_vlm", ["saec.tasks.cloud.tiny"], dict(cfg=cfg), build)


@task(name="build-tiny-llava", cache_key_fn=stage_cache_key("tiny_llava", ["saec.tasks.cloud.tiny_llava"]), **STAGE_TASK)
def tiny_llava_task(store: str, seed: int) -> StageResult:
    """The embedded default stand-in for LLaVA-1.5-7B: the same architecture, tiny, random weights."""
    from saec.tasks.cloud.tiny_llava import TinyLlavaConfig, build_tiny_llava

    def build(out: Path):
        folder = build_tiny_llava(out / "model", TinyLlavaConfig(seed=seed))
        return {"config": folder / "config.json"}, {"model_dir": "model"}

    return run_stage(store, "tiny_llava", ["saec.tasks.cloud.tiny_llava"], dict(seed=seed), build)


@task(name="train-cloud", cache_key_fn=stage_cache_key("train_cloud", TRAIN), **STAGE_TASK)
def train_cloud(store: str, sft: StageResult, base: ModelRef, cfg: CloudTrainConfig) -> StageResult:
    """QLoRA fine-tuning on the SFT split; resumes from its last checkpoint after an interruption."""
    from saec.tasks.cloud.train import train_vlm

    def build(out: Path, work: Path):
        run_cfg = cfg.model_copy(update={"model": base.path})
        info = train_vlm(run_cfg, sft.path("train_jsonl"), sft.path("val_jsonl"), work, out)
        log = out / "train_log.parquet"
        files = {"train_log": log} if log.exists() else {}
        files["summary"] = write_json_atomic(out / "train_summary.json", info)
        return files, jsonable(info)

    return run_stage(store, "train_cloud", TRAIN, dict(sft=sft, base=base, cfg=cfg), build, work_dir=True)


def adapter_ref(trained: StageResult | None = None, path: str | None = None) -> ModelRef | None:
    """The adapter a training stage wrote, or a user's adapter folder; None for the bare base model."""
    if path is not None:
        from saec.tasks.cloud.models import adapter_identity

        return ModelRef(kind="adapter", path=str(Path(path).resolve()), sha256=adapter_identity(Path(path)))
    if trained is None:
        return None
    adapter = Path(trained.dir) / "adapter"
    if not adapter.exists():
        raise FileNotFoundError(f"training output {trained.dir} holds no adapter/ folder")
    return ModelRef(kind="adapter", path=str(adapter), sha256=trained.digest())


@lru_cache(maxsize=2)
def _scorer(cfg_json: str):
    """Loaded scorers are kept between tasks of one process: SAEC's two cloud calls load the model once."""
    from saec.tasks.cloud.engine import VLMScorer

    return VLMScorer(CloudScoreConfig.model_validate_json(cfg_json))


def release_models() -> None:
    """Drop loaded scorers, so that the next system measured pays for loading its own model."""
    _scorer.cache_clear()
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@task(name="score-cloud", cache_key_fn=stage_cache_key("score_cloud", ENGINE), **STAGE_TASK)
def score_cloud(
    store: str,
    images: StageResult,
    table: str,
    model: ModelRef,
    adapter: ModelRef | None,
    cfg: CloudScoreConfig,
    telemetry: TelemetryConfig,
    label: str = "",
) -> StageResult:
    """P(defect) for every image of `images.table(table)`, measured (wall time, telemetry)."""

    def build(out: Path):
        manifest = images.table(table)
        run_cfg = cfg.model_copy(update={"model": model.path, "adapter": adapter.path if adapter else None})

        def compute():  # no model is loaded when nothing was routed here
            return _scorer(run_cfg.model_dump_json()).score_manifest(manifest, out / "scores.parquet")

        return measured_stage(out, "scores", "cloud_scores", len(manifest), compute, telemetry, label)

    return run_stage(
        store, "score_cloud", ENGINE,
        dict(images=images, table=table, model=model, adapter=adapter, cfg=cfg), build,
    )  # fmt: skip
