"""Every Parquet table the pipeline writes, declared in one place.

Each table has one row per image (keyed by `image_id`, the sha256 of the image
file's bytes) unless its description says otherwise. `conform` checks a
DataFrame against its schema before anything is written.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

_str = pa.string()
_i32 = pa.int32()
_i64 = pa.int64()
_f32 = pa.float32()
_f64 = pa.float64()
_bool = pa.bool_()

# A source dataset as read from disk (MVTec AD or KolektorSDD2 layout).
SOURCE_IMAGES = pa.schema(
    [
        ("image_id", _str),
        ("path", _str),  # absolute path of the image file
        ("rel_path", _str),  # path relative to the dataset root
        ("dataset", _str),  # "mvtec_ad" | "ksdd2"
        ("label", pa.int8()),  # 0 good, 1 defect
        ("category", _str),
        ("defect_type", _str),  # "good" for good images
        ("split", _str),  # the dataset's own split: "train" | "test"
        ("mask_path", _str),  # null where the dataset has no mask for this image
        ("width", _i32),
        ("height", _i32),
        ("mode", _str),  # PIL mode as stored on disk: L, RGB, RGBA, P, I;16 ...
        ("format", _str),  # PNG, JPEG, ...
        ("bytes", _i64),
        ("outside_root", _bool),  # the file's resolved path lies outside the resolved dataset root (a link led out)
    ]
)

# Files that were found but not used, and why. One row per file.
QUARANTINE = pa.schema(
    [
        ("path", _str),
        ("rel_path", _str),
        ("dataset", _str),
        ("kind", _str),  # "image" | "mask" | "folder"
        ("reason", _str),
        ("detail", _str),
    ]
)

# A built evaluation set (MVTec binary holdout, KSDD2 1:1) and SFT manifests.
MANIFEST = pa.schema(
    [
        ("image_id", _str),
        ("path", _str),  # the file in the built set (val/<class>/...), or the source for SFT
        ("source_path", _str),
        ("label", pa.int8()),
        ("category", _str),
        ("defect_type", _str),
        ("split", _str),  # "holdout" | "sft_train" | "sft_val"
        ("width", _i32),
        ("height", _i32),
        ("mode", _str),
    ]
)

# ---- routing and decisions (saec.tasks.routing)

ROUTING = pa.schema(
    [
        ("image_id", _str),
        ("path", _str),  # the evaluation set's file
        ("source_path", _str),  # the file it was taken from
        ("complexity", _f64),
        ("complexity_rank", _i32),  # 0 = most complex
        ("branch", _str),  # "edge" | "cloud"
        ("reason", _str),  # complexity_quota | edge_confident_good | edge_confident_defect | edge_uncertain
        ("edge_verdict", pa.int8()),  # null where the edge did not see the image
    ]
)
DECISIONS = pa.schema(
    [
        ("image_id", _str),
        ("path", _str),  # the evaluation set's file
        ("source_path", _str),  # the file it was taken from, in the user's dataset folder
        ("category", _str),
        ("defect_type", _str),  # "good" for good images
        ("label", pa.int8()),
        ("pred", pa.int8()),
        ("correct", _bool),
        ("branch", _str),
        ("reason", _str),
        ("score", _f64),  # P(defect) behind the decision where the deciding model gives one
        ("system", _str),
    ]
)

# ---- cloud branch (saec.tasks.cloud)

# One row per scored image.
CLOUD_SCORES = pa.schema(
    [
        ("image_id", _str),
        ("path", _str),  # the file scored (the evaluation set's)
        ("source_path", _str),  # the file it was taken from, as the manifest names it; null where it names none
        # softmax over the two label logits (or over mean answer log-probs with TTA). No verdict is kept
        # here: a verdict is p_defect >= routing.cloud_thr, taken where the decisions are made
        ("p_defect", _f64),
        ("logit_0", _f32),  # next-token logit of "0"; with TTA the mean summed log-prob of "Label: 0"
        ("logit_1", _f32),
        ("score_kind", _str),  # "label_logit" | "label_logit_mean" (dihedral) | "answer_logprob_mean" (five_crop)
        ("family", _str),  # "qwen2_5_vl" | "llava"
        ("model_id", _str),  # identity of the base model (config + weights)
        ("adapter_id", _str),  # content hash of the adapter folder; null without one
        ("impl", _str),  # "reference" | "fast"
        ("tta", _str),  # "none" | "five_crop" | "dihedral", per row
        ("resize", _i32),  # square side before the processor; -1 = original size
        ("width", _i32),  # image size given to the processor (first crop with TTA)
        ("height", _i32),
        ("batch_index", _i32),
        ("batch_size", _i32),
        ("batch_seconds", _f64),  # compute time of the image's batch (device synchronised)
        ("wait_seconds", _f64),  # time the compute loop waited for that batch's data
        ("explain_status", _str),  # not_requested | not_defect | ok | invalid
        ("explain_raw", _str),  # generated text; null where nothing was generated
        ("explain_bboxes", _str),  # validated JSON {"bboxes": [[x0, y0, x1, y1], ...]}
        ("explain_desc", _str),
        ("explain_error", _str),  # why an explanation is invalid
    ]
)
# One row per optimizer step of cloud-model training.
CLOUD_TRAIN_LOG = pa.schema(
    [
        ("step", _i64),  # optimizer step, from 1
        ("epoch", _i32),  # from 0
        ("loss", _f64),  # mean answer-token loss over the step's micro-batches
        ("lr", _f64),
        ("grad_norm", _f64),  # before clipping; null without clipping
        ("images", _i32),
        ("answer_tokens", _i64),
        ("tokens", _i64),  # attended tokens, image tokens included
        ("images_per_s", _f64),
        ("tokens_per_s", _f64),
        ("step_seconds", _f64),
        ("elapsed_s", _f64),  # training seconds since the start, summed over resumed sessions
        ("session", _i32),  # 0 for the first process, +1 for each resume
    ]
)

# ---- edge branch and scene complexity (saec.tasks.edge, saec.tasks.complexity)

# One row per image the edge classifier saw.
EDGE_PREDICTIONS = pa.schema(
    [
        ("image_id", _str),
        ("path", _str),  # the file classified (the evaluation set's)
        ("source_path", _str),  # the file it was taken from, as the manifest names it; null where it names none
        ("p_defect", _f64),  # probability of class "defect" (supervised); null for imagenet_rule
        ("smax", _f64),  # top-1 softmax probability
        ("margin", _f64),  # top-1 minus top-2 probability
        ("entropy", _f64),  # softmax entropy / ln(number of classes), in [0, 1]
        ("top1_class", _i32),  # index of the top-1 class
        ("top1_name", _str),  # its name (ImageNet class, or "good"/"defect")
        ("verdict", pa.int8()),  # 0 good, 1 defect: the published run's rule (imagenet_rule) or p_defect >= threshold
        ("mode", _str),  # "imagenet_rule" | "supervised"
        ("runtime", _str),  # "onnxruntime" | "onnxruntime-int8" | "torch"
        ("model_id", _str),  # sha256 (16 hex) of the weights file; "yaml-..." for a model built from a .yaml
        ("imgsz", _i32),
        ("batch_index", _i32),
        ("batch_seconds", _f64),  # inference time of the image's batch (decode excluded)
        ("wait_seconds", _f64),  # time the inference loop waited for that batch's decoded images
    ]
)
# One row per image: the published run's scene complexity and its five components.
COMPLEXITY = pa.schema(
    [
        ("image_id", _str),
        ("path", _str),  # the file scored (the evaluation set's)
        ("source_path", _str),  # the file it was taken from, as the manifest names it; null where it names none
        ("complexity", _f64),  # 0.30 H + 0.25 E + 0.20 log1p(L)/8 + 0.15 G/16 + 0.10 R/255
        ("H", _f64),  # grey-histogram entropy / ln 256
        ("E", _f64),  # mean of the Canny(64, 128) edge map, values 0/255 (so E lies in [0, 255])
        ("L", _f64),  # variance of the Laplacian
        ("G", _f64),  # mean Sobel gradient magnitude
        ("R", _f64),  # mean |image - JPEG(quality 30) re-encoding|
        ("cpx_size", _i32),  # side of the square grey resize the components are computed on
    ]
)

# ---- telemetry samples (saec.tasks.telemetry), one row per sample
TELEMETRY = pa.schema(
    [
        ("t", _f64),  # seconds since the measured section started
        ("cpu_percent", _f64),  # process tree, 100 = one core
        ("rss_bytes", _f64),
        ("gpu_util", _f64),
        ("gpu_power_w", _f64),
        ("gpu_mem_bytes", _f64),
        ("cpu_energy_j", _f64),  # RAPL package energy since the start
    ]
)

# ---- drift between two re-evaluations (saec.tasks.drift): one row per system and metric
DRIFT = pa.schema(
    [
        ("dataset", _str),
        ("system", _str),
        ("metric", _str),  # accuracy, balanced_accuracy, cloud_share, s_per_image, energy_per_correct_mwh
        ("rule", _str),  # "drop" (absolute), "shift" (absolute, either way), "increase" (relative)
        ("previous", _f64),  # null where the previous run did not measure it
        ("current", _f64),
        ("change", _f64),  # current - previous; relative to previous for rule "increase"
        ("tolerance", _f64),
        ("drifted", _bool),
        ("note", _str),
    ]
)
# ---- end drift

# Columns that record how a run went (timings, batching), not what it computed. A table's identity
# for the stages that read it leaves them out, so re-running a stage that computes the same values
# does not re-run everything after it.
MEASURED_COLUMNS: dict[str, tuple[str, ...]] = {
    "cloud_scores": ("batch_index", "batch_size", "batch_seconds", "wait_seconds"),
    "edge_predictions": ("batch_index", "batch_seconds", "wait_seconds"),
    "cloud_train_log": ("images_per_s", "tokens_per_s", "step_seconds", "elapsed_s", "session"),
}

SCHEMAS: dict[str, pa.Schema] = {
    "source_images": SOURCE_IMAGES,
    "quarantine": QUARANTINE,
    "manifest": MANIFEST,
    "edge_predictions": EDGE_PREDICTIONS,
    "complexity": COMPLEXITY,
    "routing": ROUTING,
    "decisions": DECISIONS,
    "telemetry": TELEMETRY,
    "cloud_scores": CLOUD_SCORES,
    "cloud_train_log": CLOUD_TRAIN_LOG,
    "drift": DRIFT,
}


class SchemaError(ValueError):
    pass


def register(name: str, schema: pa.Schema) -> pa.Schema:
    """Declare a table schema (stage modules call this at import for their own tables)."""
    if name in SCHEMAS and not SCHEMAS[name].equals(schema):
        raise SchemaError(f"table schema {name!r} is declared twice with different columns")
    SCHEMAS[name] = schema
    return schema


def text_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """Column `name` of `frame` as text for a per-image table: strings, None where a row has no value
    (all None where the frame has no such column)."""
    if name not in frame.columns:
        return np.full(len(frame), None, dtype=object)
    values = frame[name]
    return values.astype(object).where(values.notna(), None).map(lambda v: v if v is None else str(v)).to_numpy()


def source_paths(manifest: pd.DataFrame) -> np.ndarray:
    """The `source_path` of every row of a manifest, for the per-image tables that carry it beside
    `image_id`."""
    return text_column(manifest, "source_path")


def empty_table(name: str) -> pd.DataFrame:
    """A DataFrame with the columns and types of table `name` and no rows."""
    return SCHEMAS[name].empty_table().to_pandas()


def conform(df: pd.DataFrame, name: str) -> pa.Table:
    """Check `df` against the declared schema `name` and return it as an Arrow table."""
    try:
        schema = SCHEMAS[name]
    except KeyError:
        raise SchemaError(f"no table schema named {name!r}; known: {sorted(SCHEMAS)}") from None
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise SchemaError(f"table {name!r} lacks columns {missing}; it has {list(df.columns)}")
    extra = [c for c in df.columns if c not in schema.names]
    if extra:
        raise SchemaError(f"table {name!r} has undeclared columns {extra}; declare them in saec.artifacts.schemas")
    try:
        table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(f"table {name!r} does not fit its schema: {exc}") from exc
    return table.replace_schema_metadata({"saec.schema": name})
