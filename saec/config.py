"""The pipeline's configuration: one typed section per stage, validated before any work starts.

Values merge in one order, the later winning: the defaults (the published run's
values, and the embedded synthetic data), then a YAML file (`--config`), then
`--set section.field=value` overrides on the command line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saec import standins
from saec.datasets.synthetic import DEFAULT_CATEGORIES, SyntheticConfig
from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig, TinyModelConfig
from saec.tasks.complexity import ComplexityConfig
from saec.tasks.data import HoldoutConfig, KSDD2Config, ScanConfig
from saec.tasks.edge.config import EdgeConfig
from saec.tasks.routing import RoutingConfig
from saec.tasks.sft import SFTConfig
from saec.tasks.telemetry import TelemetryConfig
from saec.errors import ActionableError

SYSTEMS = ("saec", "edge_only", "cloud_only", "qwen_zeroshot", "llava_zeroshot")


# Per category: 160 good training images, 160 good and 80 per defect type in `test/`. The SFT
# split takes half of the test defects (40 per type, 1,280 training images in all) and the
# holdout the published run's 500 + 500 from the rest.
EMBEDDED_SYNTHETIC = dict(
    mvtec_size=128, defect_visibility=6.0, n_train_good=160, n_test_good=160, n_test_defect_per_type=80
)
# The pretraining world: its own categories, defect kinds and generator seed, the embedded look
# (size, visibility) and about as many images (3 categories x 3 defect kinds here, 4 x 4 there).
WORLD_SYNTHETIC = dict(
    seed=7, categories=["tile", "leather", "pill"], mvtec_size=128, defect_visibility=6.0,
    n_train_good=200, n_test_good=60, n_test_defect_per_type=140,
)
# The embedded cloud model's verdict threshold. The published run's 0.26 is calibrated for the 7B
# model's probabilities on real MVTec AD; the fine-tuned stand-in puts many goods between 0.26
# and 0.5 (on the embedded holdout: 88.6 % at 0.5, 75.9 % at 0.26; docs/pretrained-standins.md).
EMBEDDED_CLOUD_THR = 0.5


class ConfigError(ActionableError, ValueError):
    """The configuration is wrong; the message names the field and what to do."""


class DataConfig(BaseModel):
    """Where the images come from: the embedded synthetic data, or folders of the real datasets."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["synthetic", "folders"] = "synthetic"
    mvtec_root: Path | None = Field(None, description="MVTec AD folder (source=folders)")
    ksdd2_root: Path | None = Field(None, description="KolektorSDD2 raw folder (source=folders)")
    # The embedded default is drawn for small pretrained stand-ins that are fine-tuned in CPU
    # minutes: images at 128 px (the edge's input size; the tuned cloud stand-in sees them at
    # 140 px, CloudTrainConfig.tiny's size, and the zero-shot stand-ins at 112, the size they were
    # pretrained at), defects six times as large and strong as the generator's neutral look, and
    # 40 training examples per defect type.
    synthetic: SyntheticConfig = Field(default_factory=lambda: SyntheticConfig(**EMBEDDED_SYNTHETIC))

    @model_validator(mode="after")
    def _roots(self) -> "DataConfig":
        if self.source == "folders":
            if self.mvtec_root is None and self.ksdd2_root is None:
                raise ValueError("source=folders needs data.mvtec_root and/or data.ksdd2_root")
            for name in ("mvtec_root", "ksdd2_root"):
                root = getattr(self, name)
                if root is not None and not Path(root).expanduser().is_dir():
                    raise ValueError(f"data.{name}={root} is not an existing folder")
        return self


class CloudConfig(BaseModel):
    """The cloud model: the user's Qwen2.5-VL folder, or the embedded stand-in.

    `train` and `score` override fields of the training and scoring configs
    (saec.tasks.cloud.config); `baseline_score` is what the zero-shot baselines use (the
    published run: 448 px, batch 16). With `model` unset, the embedded recipe applies to the
    shipped stand-in (saec.standins: a tiny Qwen2.5-VL pretrained on a world the evaluation never
    shows): LoRA and the vision tower fine-tuned on the CPU in float32 (`CloudTrainConfig.tiny`),
    the zero-shot row scoring the stand-in at its own image size; `llava_model` unset scores the
    shipped LLaVA stand-in.
    """

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="local Hugging Face folder or hub id; None = the embedded stand-in")
    adapter: str | None = Field(None, description="use this trained adapter instead of training one")
    llava_model: str | None = Field(None, description="LLaVA-1.5 folder for the baseline; None = the embedded stand-in")
    train: dict[str, Any] = Field(default_factory=dict)
    score: dict[str, Any] = Field(default_factory=dict)
    baseline_score: dict[str, Any] = Field(default_factory=lambda: {"resize": 448, "batch_size": 16})

    @property
    def embedded(self) -> bool:
        return self.model is None

    def train_config(self, model_path: str) -> CloudTrainConfig:
        if self.embedded:
            return CloudTrainConfig.tiny(model_path, **self.train)
        return CloudTrainConfig(model=model_path, **self.train)

    def score_config(self, model_path: str, baseline: bool = False) -> CloudScoreConfig:
        """Scoring settings; decisions apply `routing.cloud_thr` to P(defect) later, at merge time.

        The embedded tuned model is scored at the size it was fine-tuned at, with the eight flips
        and turns on the categories its training turned (test-time augmentation), since that is
        how it learned to see them; the zero-shot stand-ins at the size they were pretrained at
        (as the published run scores its tuned model at 512 px and the zero-shot ones at 448).
        """
        values: dict[str, Any] = {"model": model_path}
        if self.embedded:
            values |= {"resize": standins.image_size(), "device": "cpu", "dtype": "float32", "batch_size": 16}
            tuned = self.train_config(model_path)
            if not baseline:
                values["resize"] = tuned.resize
                if tuned.augment == "dihedral":
                    values |= {"tta": "dihedral", "tta_categories": tuned.augment_categories}
        values |= self.baseline_score if baseline and not self.embedded else {}
        values |= self.score
        return CloudScoreConfig(**values)

    @model_validator(mode="after")
    def _check(self) -> "CloudConfig":
        errors = self.section_errors()  # every override is validated here, before any work starts
        if errors:
            raise ValueError("; ".join(errors))
        for name in ("model", "llava_model"):
            problem = model_folder_problem(getattr(self, name))
            if problem:
                raise ValueError(f"cloud.{name}={getattr(self, name)} {problem}")
        problem = adapter_folder_problem(self.adapter)
        if problem:
            raise ValueError(f"cloud.adapter={self.adapter} {problem}")
        return self

    def section_errors(self) -> list[str]:
        """What is wrong in `train`, `score` and `baseline_score`, each named by its full path."""
        errors: list[str] = []
        for section, build in (("train", lambda: self.train_config("model")),
                               ("score", lambda: self.score_config("model")),
                               ("baseline_score", lambda: self.score_config("model", baseline=True))):  # fmt: skip
            if errors and self.embedded:
                break  # the embedded model's scoring settings derive from its training recipe
            try:
                build()
            except ValidationError as exc:
                for err in exc.errors():
                    loc = ".".join(str(p) for p in err["loc"])
                    errors.append(f"cloud.{section}.{loc}: {err['msg']}" if loc else f"cloud.{section}: {err['msg']}")
        return errors


def model_folder_problem(model: str | None) -> str | None:
    """Why `model` (a Hugging Face folder, or a hub id) cannot be loaded, or None.

    A folder needs config.json and its safetensors weights; a hub id (org/name) is looked up
    in the local Hugging Face cache when the model loads, as nothing is downloaded.
    """
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.exists():
        if not str(model).startswith(("/", ".", "~")) and str(model).count("/") == 1:
            return None  # a hub id
        return "does not exist: give a local model folder (config.json and *.safetensors)"
    if not path.is_dir():
        return "is a file: give the model's folder"
    if not (path / "config.json").is_file():
        return "has no config.json: it is not a Hugging Face model folder"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return f"has an unreadable {index.name}"
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            return f"lacks {len(missing)} of the {len(shards)} weight shards its index lists (e.g. {missing[0]})"
        return None
    if not any(path.glob("*.safetensors")):
        return "holds no *.safetensors weights (only safetensors checkpoints are loaded)"
    return None


def adapter_folder_problem(adapter: str | None) -> str | None:
    """Why `adapter` is not a PEFT adapter folder, or None."""
    if adapter is None:
        return None
    path = Path(adapter).expanduser()
    if not path.is_dir():
        return "is not an existing folder"
    if not (path / "adapter_config.json").is_file():
        return "has no adapter_config.json: it is not a PEFT adapter folder"
    if not any(path.glob("*.safetensors")):
        return "holds no *.safetensors adapter weights"
    return None


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    systems: list[Literal["saec", "edge_only", "cloud_only", "qwen_zeroshot", "llava_zeroshot"]] = Field(
        default_factory=lambda: list(SYSTEMS)
    )
    datasets: list[Literal["mvtec_holdout", "ksdd2_1to1"]] = Field(
        default_factory=lambda: ["mvtec_holdout", "ksdd2_1to1"]
    )


# Where a fault can be injected: the stage task names, and the names stages have in run records.
FAULT_POINTS = frozenset({
    "synthesize-data", "scan-mvtec", "scan-ksdd2", "build-sft", "build-holdout", "build-ksdd2-1to1", "train-edge",
    "build-tiny-vlm", "build-tiny-llava", "train-cloud", "predict-edge", "complexity", "route-by-complexity",
    "route-by-confidence", "score-cloud", "merge-decisions", "report",
    "synthetic", "scan_mvtec", "scan_ksdd2", "sft", "holdout", "ksdd2_1to1", "train_edge", "tiny_vlm", "tiny_llava",
    "train_cloud",
    *(f"{dataset}/{part}" for dataset in ("mvtec_holdout", "ksdd2_1to1")
      for part in ("complexity", "quota", "saec_edge", "routing", "saec_cloud_quota", "saec_cloud_unsure", "merge",
                   "report", *SYSTEMS[1:])),
})  # fmt: skip


class FaultsConfig(BaseModel):
    """Deliberate failures, to test that a failed run resumes from the cache."""

    model_config = ConfigDict(extra="forbid")
    fail_before: list[str] = Field(default_factory=list, description="stage names (task or run-record names)")

    @field_validator("fail_before")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted({v for v in value if v.removeprefix("once:") not in FAULT_POINTS})
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}: name a stage task (train-cloud, score-cloud, ...) or a stage "
                             "of a run record (mvtec_holdout/merge, ...; `saec inspect show RUN` lists them)")  # fmt: skip
        return value


class PretrainConfig(BaseModel):
    """`saec pretrain`: the embedded stand-ins trained on the pretraining world (see flows/pretrain.py).

    `world` is a synthetic draw of categories and defect kinds that the embedded evaluation never
    shows, from its own generator seed; every weight of the tiny Qwen2.5-VL and the tiny LLaVA
    trains from random (`trainable="full"`), and the edge classifier from its model definition.
    `cloud` and `llava` override fields of their training recipes (`CloudTrainConfig`), `edge`
    fields of the edge's training (`EdgeTrainConfig`).
    """

    model_config = ConfigDict(extra="forbid")
    world: SyntheticConfig = Field(default_factory=lambda: SyntheticConfig(**WORLD_SYNTHETIC))
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="the tiny Qwen2.5-VL's shape and seed")
    cloud: dict[str, Any] = Field(default_factory=dict)
    llava: dict[str, Any] = Field(default_factory=dict)
    edge: dict[str, Any] = Field(default_factory=dict)

    @field_validator("world")
    @classmethod
    def _world_only(cls, value: SyntheticConfig) -> SyntheticConfig:
        shown = sorted(set(value.categories) & set(DEFAULT_CATEGORIES))
        if shown:
            raise ValueError(f"pretrain.world.categories holds {shown}, which the embedded evaluation uses: "
                             "a stand-in pretrained on them would be scored on what it memorised")
        return value

    @model_validator(mode="after")
    def _recipes(self) -> "PretrainConfig":
        errors = []  # bad overrides fail here, before any work, each named by its full path
        for section, build in (("cloud", lambda: self.recipe("model", "qwen")),
                               ("llava", lambda: self.recipe("model", "llava")), ("edge", self.edge_config)):
            try:
                build()
            except ValidationError as exc:
                errors += [f"pretrain.{section}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def recipe(self, model_path: str, which: Literal["qwen", "llava"]) -> CloudTrainConfig:
        """Training from random weights, every weight (`trainable="full"`), with the embedded recipe's
        numerics and turns (the world's categories have no orientation: every image may turn)."""
        values = {"trainable": "full", "train_output_layer": False, "augment_categories": None,
                  "checkpoint_every": 50, "epochs": 20, "resize": self.tiny.image_size}
        if which == "llava":
            values |= {"resize": None}  # the tiny LLaVA's processor sizes its images itself
        return CloudTrainConfig.tiny(model_path, **(values | (self.cloud if which == "qwen" else self.llava)))

    def edge_config(self) -> EdgeConfig:
        """The edge stand-in: YOLO11n-cls from its model definition (random), supervised, trained on the world."""
        return EdgeConfig(weights="yolo11n-cls.yaml", train={**EdgeConfig().train.model_dump(), "epochs": 15, **self.edge})


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: Path | str = Field(Path("artifacts/store"), description="artifact store: a folder (git-ignored), or an "
                             "object store URL such as s3://bucket/prefix (credentials from the environment)")

    @field_validator("root", mode="before")
    @classmethod
    def _root(cls, value: Any) -> Path | str:
        from saec.artifacts.remote import is_url

        if not is_url(value):
            return Path(value)
        protocol, _, rest = str(value).partition("://")
        url = f"{protocol}://{rest.rstrip('/')}"
        protocol = protocol.lower()
        if not rest.strip("/"):
            raise ValueError(f"{url!r} names no bucket: use s3://bucket or s3://bucket/prefix")
        import fsspec

        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as exc:
            raise ValueError(f"{url!r} needs the {protocol}:// client, which is not installed ({exc}): "
                             "pip install 'saec[s3]'") from None  # fmt: skip
        except ValueError:
            raise ValueError(f"{url!r}: {protocol}:// is not a storage scheme this installation knows; "
                             "use a folder or an s3://bucket/prefix URL") from None  # fmt: skip
        return url

    @property
    def location(self) -> str:
        """The store as one string: the URL, or the folder's absolute path."""
        return self.root if isinstance(self.root, str) else str(Path(self.root).expanduser().resolve())

    def resolved(self) -> "StoreConfig":
        """This configuration with a folder given as its absolute path (a URL as it is)."""
        return self if isinstance(self.root, str) else self.model_copy(update={"root": Path(self.location)})


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: DataConfig = Field(default_factory=DataConfig)
    scan: ScanConfig = Field(default_factory=ScanConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig)
    ksdd2: KSDD2Config = Field(default_factory=KSDD2Config)
    edge: EdgeConfig = Field(default_factory=EdgeConfig)
    cloud: CloudConfig = Field(default_factory=CloudConfig)
    complexity: ComplexityConfig = Field(default_factory=ComplexityConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @model_validator(mode="after")
    def _embedded_threshold(self) -> "PipelineConfig":
        """The embedded model's own verdict threshold, unless `routing.cloud_thr` is set; one cloud
        verdict threshold everywhere (see `score_config`)."""
        if self.cloud.embedded and "cloud_thr" not in self.routing.model_fields_set:
            self.routing = self.routing.model_copy(update={"cloud_thr": EMBEDDED_CLOUD_THR})
        for section in ("score", "baseline_score"):
            given = getattr(self.cloud, section).get("threshold")
            if given is not None and given != self.routing.cloud_thr:
                raise ValueError(f"cloud.{section}.threshold={given} differs from routing.cloud_thr="
                                 f"{self.routing.cloud_thr}, the threshold every decision uses: set routing.cloud_thr")
        return self

    def score_config(self, model_path: str, baseline: bool = False) -> CloudScoreConfig:
        """The cloud scoring settings of this pipeline: `cloud.score_config`, with the verdict threshold
        (which images get explanations) set to `routing.cloud_thr`, the one the decisions and metrics
        apply. Scores tables keep P(defect) only, so without explanations the threshold is not part
        of the scoring stages' keys: changing it re-runs the merge and the reports, not the scoring."""
        return self.cloud.score_config(model_path, baseline).model_copy(update={"threshold": self.routing.cloud_thr})


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


# A configuration is a few dozen values: these bounds only stop files that are not one.
MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 100
MAX_VALUES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses duplicate keys and counts aliases."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise ConfigError(f"more than {MAX_ALIASES} YAML aliases (*name): write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one section")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _count_values(obj: Any, limit: int) -> int:
    """Values in `obj` with aliases expanded, stopping past `limit`."""
    count, stack = 0, [obj]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def read_yaml(path: Path) -> Any:
    """A config file's YAML: UTF-8, at most 1 MB, no duplicate keys, no alias bombs."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = path.read_bytes()
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {len(data):,} bytes; a configuration is at most {MAX_CONFIG_BYTES:,}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    try:
        tree = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if _count_values(tree, MAX_VALUES) > MAX_VALUES:
        raise ConfigError(f"config file {path} expands to more than {MAX_VALUES:,} values (aliases): write it out plainly")
    return tree


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _onto_defaults(default: BaseModel, tree: dict) -> dict:
    """`tree` with every partial section completed from the default it refines.

    Setting one field of a section changes that field only: a section whose default is made
    with values of its own (the embedded synthetic data, the baselines' scoring settings) keeps
    them, at any depth. What the user did not set stays unset (validators that look at which
    fields were set, such as the embedded cloud threshold, see the same as before).
    """
    out = {}
    for key, value in tree.items():
        current = getattr(default, key, None) if key in type(default).model_fields else None
        if isinstance(value, dict) and isinstance(current, BaseModel):
            out[key] = _deep_merge(current.model_dump(exclude_unset=True), _onto_defaults(current, value))
        elif isinstance(value, dict) and isinstance(current, dict):
            out[key] = _deep_merge(current, value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults, then the YAML file, then `key.path=value` overrides (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        tree = read_yaml(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: the value is not valid YAML: {' '.join(str(exc).split())}") from None
        _set_path(tree, key.strip(), value)
    try:
        return PipelineConfig.model_validate(_onto_defaults(PipelineConfig(), tree))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            shown = f" (got {_short(err['input'])})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
            named = msg.startswith((f"{loc}.", f"{loc}=")) and loc  # the message names its full path itself
            lines.append(f"  {msg}" if named else f"  {loc}: {msg}{shown}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
