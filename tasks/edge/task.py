"""Stages of the edge branch: train the two-class classifier, classify images (measured), and
merge the outputs of a classification run as shards."""
from __future__ import annotations

import socket
from pathlib import Path

import pandas as pd

from saec.artifacts.store import (FileRef, StageResult, read_paths, read_table, readable_jsonl, with_read_paths,
                                  write_json_atomic, write_table)  # fmt: skip
from saec.tasks.edge.config import EdgeConfig
from saec.tasks.stage import Built, Shard, stage
from saec.tasks.telemetry import TelemetryConfig, combine_summaries, jsonable, measured_stage, serial_samples


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
    shard: Shard | None = None,
) -> Built:
    """Edge verdicts and confidence measures for every image of `images.table(table)`, measured.

    With `shard`, for that shard's rows only: the table is cut into whole batches of
    `cfg.batch_size` rows, so each image is classified in the same batch as without shards, and
    int8 ranges are calibrated on the same sample of the whole table. `edge_shards_merge` puts
    the shards together again.
    """
    from saec.tasks.edge.predict import calibrate_thresholds, int8_calibration_sample, predict_edge

    manifest = images.table(table)
    weights = trained.path("model") if trained is not None else None
    cache = Path(store) / "cache" / "edge"  # exported ONNX graphs, by model identity
    calibration = part = None
    if shard is not None:
        start, stop = shard.bounds(len(manifest), cfg.batch_size)
        part = {"index": shard.index, "count": shard.count, "rows": [start, stop], "table_rows": len(manifest),
                "host": socket.gethostname()}  # fmt: skip
        if cfg.precision == "int8" and len(manifest):
            picked = int8_calibration_sample(cfg, range(len(manifest)))
            calibration = read_paths(with_read_paths(store, manifest.iloc[picked]))
        manifest = manifest.iloc[start:stop].reset_index(drop=True)
    manifest = with_read_paths(store, manifest)  # from an object store, this machine fetches only these rows' images

    def compute():
        thresholds = None
        if cfg.mode == "imagenet_rule" and cfg.needs_calibration:
            train = sft.table("train_manifest")
            thresholds = calibrate_thresholds(cfg, with_read_paths(store, train[train.label == 0]), cache, weights)
        info = predict_edge(cfg, manifest, out / "predictions.parquet", cache, weights, thresholds, calibration)
        if calibration is not None and "int8" in info:
            info["int8"]["calibration"] = "sample of the whole table's images"
        return info

    files, info = measured_stage(out, "predictions", "edge_predictions", len(manifest), compute, telemetry, label)
    if part is not None:
        info["shard"] = part
    return files, info


# Run information that adds up over shards; the rest is the same for every shard, or listed per shard.
_SUMMED = ("n_images", "rows", "defect_verdicts", "wall_seconds", "inference_seconds", "wait_seconds")


@stage("edge_shards_merge", task="merge-edge-shards", observe=("label",), merges="predict-edge")
def edge_shards_merge(out: Path, parts: list[StageResult], label: str = "") -> Built:
    """The outputs of `predict_edge` over a whole table from those of its shards, in shard order.

    The predictions are the shards' rows in the table's order, batches numbered as one run
    numbers them; the telemetry is the shards' samples one after another. `seconds` is the sum
    of the shards' seconds (the serial cost) and `span_s` the longest shard's (the wall time
    when they run side by side).
    """
    shards = _check_parts(parts)
    frames, batches = [], 0
    for p in parts:
        frame = read_table(p.path("predictions"))
        frames.append(frame.assign(batch_index=frame.batch_index + batches))
        batches += int(frame.batch_index.max()) + 1 if len(frame) else 0
    filled = [f for f in frames if len(f)]
    merged = pd.concat(filled, ignore_index=True) if filled else frames[0]
    ref = write_table(merged, "edge_predictions", out / "predictions.parquet")
    files = {"predictions": Path(ref.path)}
    seconds = [float(p.info.get("seconds", 0.0)) for p in parts]
    info = {"images": sum(int(p.info.get("images", 0)) for p in parts), "seconds": sum(seconds), "span_s": max(seconds),
            "label": label}  # fmt: skip
    measured = [p for p in parts if "telemetry" in p.outputs]
    if measured:
        write_table(serial_samples([p.table("telemetry") for p in measured]), "telemetry", out / "telemetry.parquet")
        files["telemetry"] = out / "telemetry.parquet"
        info["telemetry"] = combine_summaries([p.info["telemetry"] for p in measured])
        info["run"] = _merged_run([p.info["run"] for p in measured], ref)
    info["shards"] = [{**s, "images": int(p.info.get("images", 0)), "seconds": p.info.get("seconds"), "key": p.key}
                      for s, p in zip(shards, parts)]  # fmt: skip
    return files, info


def _check_parts(parts: list[StageResult]) -> list[dict]:
    """The shard records of `parts`, checked: every shard of one table, in order, each once."""
    if not parts:
        raise ValueError("edge_shards_merge needs the outputs of the shards, got none")
    shards = [p.info.get("shard") if p.stage == "predict_edge" else None for p in parts]
    if any(s is None for s in shards):
        raise ValueError("edge_shards_merge merges outputs of predict_edge run with a shard; got "
                         f"{[(p.stage, p.key) for p, s in zip(parts, shards) if s is None]}")  # fmt: skip
    count, total, at = len(parts), shards[0]["table_rows"], 0
    for i, s in enumerate(shards):
        if (s["index"], s["count"], s["table_rows"]) != (i, count, total) or s["rows"][0] != at:
            raise ValueError(f"edge_shards_merge: part {i} is shard {s['index'] + 1} of {s['count']} over rows "
                             f"{s['rows']} of {s['table_rows']}; expected shard {i + 1} of {count} from row {at} of {total}")
        at = s["rows"][1]
    if at != total:
        raise ValueError(f"edge_shards_merge: the shards cover {at} of the table's {total} rows")
    return shards


def _merged_run(runs: list[dict], ref: FileRef) -> dict:
    """The run information of the shards that classified images, as one run's."""
    out: dict = {}
    for key in dict.fromkeys(k for r in runs for k in r):
        values = [r.get(key) for r in runs]
        if key in _SUMMED:
            out[key] = round(sum(v or 0 for v in values), 4)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            out[key] = {"per_shard": values}
    wall = out.get("wall_seconds")
    out["images_per_second"] = round(out.get("n_images", 0) / wall, 3) if wall else None
    return out | {"out_path": ref.path, "sha256": ref.sha256, "rows": ref.rows, "shards": len(runs)}
