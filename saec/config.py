"""The pipeline's configuration: one typed section per stage, validated before any work starts.

Values merge in one order, the later winning: the defaults (the seed's published
values, and the embedded synthetic data), then a YAML file (`--config`), then
`--set section.field=value` overrides on the command line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from saec.datasets.synthetic import SyntheticConfig
from saec.tasks.data import HoldoutConfig, KSDD2Config, ScanConfig
from saec.tasks.sft import SFTConfig


class ConfigError(ValueError):
    """The configuration is wrong; the message names the field and what to do."""


class DataConfig(BaseModel):
    """Where the images come from: the embedded synthetic data, or folders of the real datasets."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["synthetic", "folders"] = "synthetic"
    mvtec_root: Path | None = Field(None, description="MVTec AD folder (source=folders)")
    ksdd2_root: Path | None = Field(None, description="KolektorSDD2 raw folder (source=folders)")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

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


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: Path = Field(Path("artifacts/store"), description="artifact store folder (git-ignored)")


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: DataConfig = Field(default_factory=DataConfig)
    scan: ScanConfig = Field(default_factory=ScanConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig)
    ksdd2: KSDD2Config = Field(default_factory=KSDD2Config)
    store: StoreConfig = Field(default_factory=StoreConfig)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults, then the YAML file, then `key.path=value` overrides (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err else ""))
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
