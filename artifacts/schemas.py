"""Every Parquet table the pipeline writes, declared in one place.

Each table has one row per image (keyed by `image_id`, the sha256 of the image
file's bytes) unless its description says otherwise. `conform` checks a
DataFrame against its schema before anything is written.
"""
from __future__ import annotations

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

SCHEMAS: dict[str, pa.Schema] = {
    "source_images": SOURCE_IMAGES,
    "quarantine": QUARANTINE,
    "manifest": MANIFEST,
}


class SchemaError(ValueError):
    pass


def register(name: str, schema: pa.Schema) -> pa.Schema:
    """Declare a table schema (stage modules call this at import for their own tables)."""
    if name in SCHEMAS and not SCHEMAS[name].equals(schema):
        raise SchemaError(f"table schema {name!r} is declared twice with different columns")
    SCHEMAS[name] = schema
    return schema


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
