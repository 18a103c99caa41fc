"""The embedded default's models: small stand-ins shipped in `saec/pretrained/`.

A tiny Qwen2.5-VL, a tiny LLaVA-1.5 and a YOLO11n-cls edge classifier, pretrained by `saec
pretrain` on a synthetic world whose categories and defect kinds the embedded evaluation never
shows (`saec/pretrained/provenance.json` records how each was made and every file's hash). The
embedded run starts from them as the real system starts from published weights: the cloud
model is fine-tuned with LoRA, the edge classifier fine-tuned, and the zero-shot baselines score
them as they are.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from saec.errors import ActionableError

FOLDER = Path(__file__).resolve().parent / "pretrained"
Name = Literal["qwen", "llava", "edge"]


class StandinsMissing(ActionableError, FileNotFoundError):
    """The package's stand-in files are not where the package keeps them."""


def standin(name: Name) -> Path:
    """The stand-in's model folder (qwen, llava), or the edge classifier's model.json."""
    return FOLDER / "edge" / "model.json" if name == "edge" else FOLDER / name


@lru_cache(maxsize=None)
def image_size(name: Literal["qwen", "llava"] = "qwen") -> int:
    """The side of the square images the stand-in was pretrained on."""
    record = FOLDER / name / "saec_tiny.json"
    if not record.is_file():
        raise StandinsMissing(f"the embedded stand-ins are missing ({record} does not exist): reinstall the saec "
                              "package, or set cloud.model (and cloud.llava_model, edge.weights) to your own models")
    return int(json.loads(record.read_text())["recipe"]["image_size"])
