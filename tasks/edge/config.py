"""Typed configuration of the edge branch: which classifier, how it is run, and how it is trained.

Two modes share one runtime:

* ``imagenet_rule`` (the published run's edge): a pretrained ImageNet classifier, not fine-tuned, at
  ``imgsz=448``; a verdict comes from confidence rules on its 1000-class softmax.
* ``supervised``: a two-class (good/defect) YOLO11-cls trained on the SFT train split; the
  verdict is ``p_defect >= defect_threshold``. Its default ``imgsz`` is 128: an epoch over the
  embedded 1,280 training images then takes about 18 s of a 2-core CPU, and small defects of
  the embedded synthetic data stay visible at that size. Use 224 (Ultralytics' own
  classification size) or more on real data with a faster machine.

Confidence measures (smax, margin, normalised entropy) are computed in both modes; the
routing stage applies the keep rule to them. Every config validates at construction, so a
missing weights file or a bad value fails before any image is read.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from saec.artifacts.hashing import sha256_file
from saec.env import available_cores
from saec.standins import standin

EdgeMode = Literal["imagenet_rule", "supervised"]
Runtime = Literal["auto", "onnxruntime", "torch"]
Precision = Literal["fp32", "int8"]

# Seed run values (SEED-ALGORITHMS section 3).
SEED_SMAX_THR = 0.55
SEED_MARGIN_THR = 0.03
SEED_ENT_THR = 0.95
DEFAULT_IMGSZ = {"imagenet_rule": 448, "supervised": 128}

# Train arguments this module sets itself; `extra` may not override them.
_RESERVED_TRAIN_ARGS = frozenset(
    {"data", "epochs", "imgsz", "batch", "device", "project", "name", "exist_ok", "workers", "seed",
     "deterministic", "pretrained", "resume", "model", "task", "mode", "amp", "plots", "verbose"}
)


@lru_cache(maxsize=1)
def _ultralytics_root() -> Path:
    spec = find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the ultralytics package is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def ultralytics_train_args() -> frozenset[str]:
    """Every argument name Ultralytics' trainer accepts (read from its default.yaml, no import)."""
    data = yaml.safe_load((_ultralytics_root() / "cfg" / "default.yaml").read_text())
    return frozenset(data)


def find_model_yaml(name: str) -> Path | None:
    """The Ultralytics model definition that `name` (e.g. ``yolo11n-cls.yaml``) resolves to, or None.

    Ultralytics drops the scale letter to find the shared file (``yolo11n-cls`` -> ``yolo11-cls``).
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    if path.parent != Path("."):
        return None
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", path.stem) + path.suffix
    models = _ultralytics_root() / "cfg" / "models"
    for candidate in (path.name, unified):
        hits = sorted(models.rglob(candidate))
        if hits:
            return hits[0]
    return None


def is_model_yaml(weights: str) -> bool:
    return Path(weights).suffix.lower() in (".yaml", ".yml")


SAVED_FORMAT = "saec-edge-classifier"  # the "format" of a model.json that SAEC's edge saving writes


def is_saved_model(weights: str | Path) -> bool:
    """A model.json written by the project's own saving (definition + safetensors weights)."""
    return Path(weights).suffix.lower() == ".json"


def saved_model_problem(model_json: Path) -> str | None:
    """Why `model_json` is not a loadable saved edge model (read without importing torch), or None."""
    if not model_json.is_file():
        return "does not exist"
    try:
        meta = json.loads(model_json.read_text())
    except (OSError, ValueError) as exc:
        return f"cannot be read as JSON ({exc})"
    if not isinstance(meta, dict) or meta.get("format") != SAVED_FORMAT:
        return "is not an edge model written by SAEC (a model.json beside its model.safetensors)"
    missing = sorted({"weights", "weights_sha256", "yaml", "names"} - set(meta))
    if missing:
        return f"lacks {missing}"
    weights = meta["weights"]
    if not isinstance(weights, str) or not (model_json.parent / weights).is_file():
        return f"names weights {weights!r} that do not exist beside it"
    return None


def read_saved_model(model_json: str | Path) -> tuple[dict[str, Any], Path]:
    """(metadata, weights file) of a saved model.json; ValueError naming the problem otherwise."""
    model_json = Path(model_json)
    problem = saved_model_problem(model_json)
    if problem:
        raise ValueError(f"edge model {model_json} {problem}")
    meta = json.loads(model_json.read_text())
    return meta, model_json.parent / meta["weights"]


def weights_identity(weights: str) -> dict[str, str | None]:
    """The content behind `edge.weights`: the checkpoint's bytes, the model definition's, or a saved
    model's definition and weights."""
    if is_model_yaml(weights):
        found = find_model_yaml(weights)
        return {"yaml": Path(weights).name, "definition": sha256_file(found) if found else None}
    if is_saved_model(weights):
        _, tensors = read_saved_model(weights)
        return {"saved": sha256_file(weights), "weights": sha256_file(tensors)}
    return {"checkpoint": sha256_file(weights)}


class Thresholds(BaseModel):
    """The published run's confidence rule: good iff smax >= smax_thr and margin >= margin_thr and entropy <= ent_thr."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    smax_thr: float = Field(ge=0.0, le=1.0)
    margin_thr: float = Field(ge=0.0, le=1.0)
    ent_thr: float = Field(ge=0.0, le=1.0)
    source: Literal["config", "calibrated", "mixed"] = "config"


class EdgeTrainConfig(BaseModel):
    """Ultralytics classification training for the supervised mode (CPU, seeded, deterministic).

    Augmentation differs from Ultralytics' defaults where those change the label: no random
    erasing (it can erase the only defect and leave a 'defect' label on a clean image),
    crops that keep the whole frame (`scale=0`), and no flips (a mirrored part is itself a
    defect in some categories: MVTec's "misplaced" and "flip" types). No RandAugment by default:
    its rotations, shears and colour changes move or wash out small defects, and on the embedded
    synthetic data a YOLO11n-cls trained from scratch with it stayed at chance after 15 epochs
    (training loss 0.69 throughout); without it, the same run learned. The smaller class is
    oversampled to balance the classes (`balance_classes`). Five epochs fine-tune the embedded
    stand-in (88.3 % on the embedded MVTec holdout, against 90.1 % for 15 epochs from random
    weights, in a third of the time; docs/pretrained-standins.md); `saec pretrain` trains 15 from
    random.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: int = Field(5, ge=1)
    batch: int = Field(32, ge=1)
    optimizer: str = "auto"
    lr0: float | None = Field(None, gt=0.0, description="None: Ultralytics' choice for the optimizer")
    patience: int = Field(100, ge=1)
    workers: int = Field(0, ge=0, description="dataloader worker processes; 0 loads in the training process")
    seed: int = 0
    cache: Literal[False, "ram", "disk"] = False
    balance_classes: bool = True
    checkpoint: Literal["last", "best"] = Field(
        "last",
        description="which of Ultralytics' checkpoints becomes the edge model; 'best' is chosen on the SFT val "
        "split, which in this pipeline holds the same test/ images as the MVTec holdout",
    )
    scale: float = Field(0.0, ge=0.0, le=1.0)
    erasing: float = Field(0.0, ge=0.0, le=1.0)
    fliplr: float = Field(0.0, ge=0.0, le=1.0)
    flipud: float = Field(0.0, ge=0.0, le=1.0)
    auto_augment: Literal["randaugment", "autoaugment", "augmix"] | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="any other Ultralytics train argument")

    @field_validator("extra")
    @classmethod
    def _extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(set(value) & _RESERVED_TRAIN_ARGS)
        if reserved:
            raise ValueError(f"edge.train.extra may not set {reserved}: they are fields of the edge config or fixed")
        unknown = sorted(set(value) - ultralytics_train_args())
        if unknown:
            raise ValueError(f"edge.train.extra has arguments Ultralytics does not know: {unknown}")
        return value

    def ultralytics_args(self) -> dict[str, Any]:
        args = self.model_dump(exclude={"extra", "lr0", "balance_classes", "checkpoint"})
        if self.lr0 is not None:
            args["lr0"] = self.lr0
        return args | self.extra


class EdgeConfig(BaseModel):
    """The edge classifier and its CPU runtime.

    `weights` is a local checkpoint (``yolo11s-cls.pt``: used as is in the rule mode, the
    starting point of fine-tuning in the supervised mode), a model.json that SAEC saved (by
    default the shipped YOLO11n-cls stand-in, pretrained on a world the embedded evaluation
    never shows; see saec.standins) or an Ultralytics model definition (``yolo11n-cls.yaml``:
    built with random weights seeded by `seed`). Nothing is ever downloaded.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: EdgeMode = "supervised"
    weights: str = Field(default_factory=lambda: str(standin("edge")), validate_default=True,
                         description="a .pt checkpoint, a saved model.json or a model .yaml; default: the stand-in")
    seed: int = Field(0, description="seeds the random weights of a model built from a .yaml")
    imgsz: int | None = Field(None, ge=32, le=2048, description="None: 448 (imagenet_rule) or 128 (supervised)")
    # seed run thresholds; None = calibrate on train/good images
    smax_thr: float | None = Field(SEED_SMAX_THR, ge=0.0, le=1.0)
    margin_thr: float | None = Field(SEED_MARGIN_THR, ge=0.0, le=1.0)
    ent_thr: float | None = Field(SEED_ENT_THR, ge=0.0, le=1.0)
    calibration_quantiles: tuple[float, float, float] = Field(
        (0.20, 0.20, 0.80), description="quantiles of smax, margin, entropy on train/good images"
    )
    defect_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="supervised: defect iff p_defect >= this")
    # runtime
    runtime: Runtime = "auto"
    batch_size: int = Field(32, ge=1, le=4096)
    threads: int | None = Field(None, ge=1, description="inference threads; None = all available cores")
    io_threads: int | None = Field(None, ge=1, description="decode/preprocess threads; None = available cores")
    prefetch_batches: int = Field(2, ge=1, description="batches decoded ahead of inference")
    opset: int = Field(17, ge=11, le=23)
    precision: Precision = Field(
        "fp32",
        description="int8: ONNX Runtime static quantization (per-channel QDQ), calibrated on images; "
        "faster on CPUs with VNNI, probabilities differ from PyTorch by the quantization error",
    )
    int8_calibration_images: int = Field(32, ge=1, le=4096, description="images the int8 ranges are calibrated on")
    progress: bool = True
    train: EdgeTrainConfig = Field(default_factory=EdgeTrainConfig)

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        value = str(value).strip()
        if not value:
            raise ValueError("edge.weights is empty; give a local .pt file or an Ultralytics model .yaml")
        if "://" in value:
            raise ValueError(f"edge.weights={value!r} is a URL; nothing is downloaded, give a local file")
        if is_model_yaml(value):
            if find_model_yaml(value) is None:
                raise ValueError(
                    f"edge.weights={value!r}: no such model definition, neither a file nor one of Ultralytics' "
                    "cfg/models (e.g. yolo11n-cls.yaml)"
                )
            return value
        path = Path(value).expanduser()
        if is_saved_model(value):
            problem = saved_model_problem(path)
            if problem:
                raise ValueError(f"edge.weights={value!r} {problem}; give a saved edge model's model.json, "
                                 "a .pt checkpoint or a model .yaml")  # fmt: skip
            return str(path.resolve())
        if path.suffix.lower() != ".pt":
            raise ValueError(f"edge.weights={value!r}: expected a .pt checkpoint, a saved model.json or a model .yaml")
        if not path.is_file():
            raise ValueError(
                f"edge.weights file {path} does not exist; pass a local path to YOLO classification weights "
                "(e.g. yolo11s-cls.pt) or a model .yaml such as yolo11n-cls.yaml"
            )
        return str(path.resolve())

    @field_validator("calibration_quantiles")
    @classmethod
    def _quantiles(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 <= q <= 1.0 for q in value):
            raise ValueError(f"edge.calibration_quantiles must lie in [0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _resolve(self) -> "EdgeConfig":
        if self.precision == "int8" and self.runtime == "torch":
            raise ValueError("edge.precision=int8 runs on ONNX Runtime; set edge.runtime to auto or onnxruntime")
        if self.imgsz is None:
            object.__setattr__(self, "imgsz", DEFAULT_IMGSZ[self.mode])
        return self

    def cache_key_view(self) -> dict:
        """What a cache key holds of this config: the weights by content, never by path."""
        return self.model_dump(mode="json") | {"weights": weights_identity(self.weights)}

    # ------------------------------------------------------------------ derived values
    @property
    def from_yaml(self) -> bool:
        return is_model_yaml(self.weights)

    @property
    def needs_calibration(self) -> bool:
        return None in (self.smax_thr, self.margin_thr, self.ent_thr)

    def config_thresholds(self) -> Thresholds | None:
        """The thresholds as configured, or None when any of them is to be calibrated."""
        if self.needs_calibration:
            return None
        return Thresholds(smax_thr=self.smax_thr, margin_thr=self.margin_thr, ent_thr=self.ent_thr, source="config")

    def resolved_threads(self) -> int:
        return self.threads or available_cores()

    def resolved_io_threads(self) -> int:
        return self.io_threads or available_cores()
