"""Prefect tasks of the cloud branch: build the embedded model, train, score.

The engine modules beside this one import neither Prefect nor Ultralytics (they run on
GPU machines without them); only this module binds them to the flow.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from saec.artifacts.hashing import hash_followed_tree
from saec.artifacts.store import StageResult, readable_jsonl, with_read_paths, write_json_atomic
from saec.env import pin_torch_threads
from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig, TinyModelConfig
from saec.tasks.stage import Built, ModelRef, stage
from saec.tasks.telemetry import TelemetryConfig, jsonable, measured_stage


def model_ref(path: str | Path, kind: str = "vlm") -> ModelRef:
    """Reference a user's model folder by the content of all its files (a weights file's hash is
    remembered between runs while the file is unchanged, see `sha256_file_cached`)."""
    from saec.tasks.cloud.models import resolve_model_dir, weight_files

    folder = resolve_model_dir(path)
    weight_files(folder)  # a weightless folder fails here, naming what is missing
    return ModelRef(kind=kind, path=str(folder), sha256=hash_followed_tree(folder)[0])


def model_of(built: StageResult) -> ModelRef:
    return ModelRef(kind=built.stage, path=str(Path(built.dir) / "model"), sha256=built.digest(),
                    source={"stage": built.stage, "key": built.key, "rel": "model"})  # fmt: skip


@stage("tiny_vlm", task="build-tiny-vlm")
def tiny_vlm_task(out: Path, cfg: TinyModelConfig) -> Built:
    """The embedded default cloud model: a tiny Qwen2.5-VL folder with random weights."""
    from saec.tasks.cloud.tiny import build_tiny_qwen

    folder = build_tiny_qwen(out / "model", cfg)
    return {"model": folder, "config": folder / "config.json"}, {"model_dir": "model"}


@stage("tiny_llava", task="build-tiny-llava")
def tiny_llava_task(out: Path, seed: int) -> Built:
    """The embedded default stand-in for LLaVA-1.5-7B: the same architecture, tiny, random weights."""
    from saec.tasks.cloud.tiny_llava import TinyLlavaConfig, build_tiny_llava

    folder = build_tiny_llava(out / "model", TinyLlavaConfig(seed=seed))
    return {"model": folder, "config": folder / "config.json"}, {"model_dir": "model"}


@stage("train_cloud", task="train-cloud", work_dir=True, measurements=("train_log", "summary"))
def train_cloud(out: Path, work: Path, store: str, sft: StageResult, base: ModelRef, cfg: CloudTrainConfig) -> Built:
    """QLoRA fine-tuning on the SFT split; resumes from its last checkpoint after an interruption."""
    from saec.tasks.cloud.train import train_vlm

    pin_torch_threads()
    run_cfg = cfg.model_copy(update={"model": base.path})
    train, val = (readable_jsonl(store, sft.path(name), work) for name in ("train_jsonl", "val_jsonl"))
    info = train_vlm(run_cfg, train, val, work, out)
    log = out / "train_log.parquet"
    files = {"train_log": log} if log.exists() else {}
    files["summary"] = write_json_atomic(out / "train_summary.json", info)
    files.update({name: out / name for name in ("adapter", "model") if (out / name).is_dir()})
    return files, jsonable(info)


def adapter_ref(trained: StageResult | None = None, path: str | None = None) -> ModelRef | None:
    """The adapter a training stage wrote, or a user's adapter folder; None for the bare base model."""
    if path is not None:
        return ModelRef(kind="adapter", path=str(Path(path).resolve()), sha256=hash_followed_tree(Path(path))[0])
    if trained is None:
        return None
    adapter = Path(trained.dir) / "adapter"
    if not adapter.exists():
        raise FileNotFoundError(f"training output {trained.dir} holds no adapter/ folder")
    return ModelRef(kind="adapter", path=str(adapter), sha256=trained.digest(),
                    source={"stage": trained.stage, "key": trained.key, "rel": "adapter"})  # fmt: skip


class LoadedScorers:
    """Scorers kept loaded between the tasks of one process: SAEC's two cloud stages load the model
    once. One lock serialises loading, so a stage that asks for a scorer being preloaded waits for
    that load instead of starting a second one. (A class, not a module-level dict: what it holds at
    run time must not read as part of the stage's code when its cache key is computed.)"""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._scorers: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, cfg_json: str):
        from saec.tasks.cloud.engine import VLMScorer

        with self._lock:
            if cfg_json in self._scorers:
                self._scorers.move_to_end(cfg_json)
                return self._scorers[cfg_json]
            scorer = VLMScorer(CloudScoreConfig.model_validate_json(cfg_json))
            self._scorers[cfg_json] = scorer
            while len(self._scorers) > self.keep:
                self._scorers.popitem(last=False)
            return scorer

    def clear(self) -> None:
        with self._lock:  # waits for a load in progress
            self._scorers.clear()


_LOADED = LoadedScorers()


def _scorer(cfg_json: str):
    return _LOADED.get(cfg_json)


def release_models() -> None:
    """Drop loaded scorers, so that the next system measured pays for loading its own model."""
    _LOADED.clear()
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def local_scorer_key(cfg: CloudScoreConfig, model: ModelRef, adapter: ModelRef | None) -> str | None:
    """The scorer `score_cloud` loads in this process for these arguments (its cache key), or None
    when it scores on several devices, each in a process of its own."""
    from saec.tasks.cloud.parallel import resolve_devices

    run_cfg = cfg.model_copy(update={"model": model.path, "adapter": adapter.path if adapter else None})
    devices = resolve_devices(run_cfg)
    if len(devices) > 1:
        return None
    return run_cfg.model_copy(update={"device": devices[0], "devices": None}).model_dump_json()


def preload_scorer(cfg: CloudScoreConfig, model: ModelRef, adapter: ModelRef | None) -> threading.Thread | None:
    """Start loading the scorer that `score_cloud` will ask for, on a background thread.

    The stage then finds it loaded (or waits for the load to finish). A failed preload is only
    logged: the stage loads again and raises the error itself. None when the stage would score on
    several devices (each process loads its own copy)."""
    key = local_scorer_key(cfg, model, adapter)
    if key is None:
        return None

    def load() -> None:
        try:
            pin_torch_threads()
            _scorer(key)
        except Exception as exc:  # the stage meets the same error and reports it
            logging.getLogger(__name__).warning("preloading the cloud model failed (%s: %s); the stage loads it "
                                                "again", type(exc).__name__, exc)  # fmt: skip

    thread = threading.Thread(target=load, name="saec-preload", daemon=True)
    thread.start()
    return thread


@stage("score_cloud", task="score-cloud", observe=("telemetry", "label"))
def score_cloud(
    out: Path,
    store: str,
    images: StageResult,
    table: str,
    model: ModelRef,
    adapter: ModelRef | None,
    cfg: CloudScoreConfig,
    telemetry: TelemetryConfig,
    label: str = "",
) -> Built:
    """P(defect) for every image of `images.table(table)`, measured (wall time, telemetry)."""
    manifest = with_read_paths(store, images.table(table))
    run_cfg = cfg.model_copy(update={"model": model.path, "adapter": adapter.path if adapter else None})

    def compute():  # no model is loaded when nothing was routed here
        from saec.tasks.cloud.parallel import score_manifest_sharded

        pin_torch_threads()
        key = local_scorer_key(cfg, model, adapter)
        if key is None:  # one process per device, each loading its own copy
            return score_manifest_sharded(run_cfg, manifest, out / "scores.parquet")
        return _scorer(key).score_manifest(manifest, out / "scores.parquet")

    return measured_stage(out, "scores", "cloud_scores", len(manifest), compute, telemetry, label)
