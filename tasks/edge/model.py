"""Loading and saving the edge classifier, and its identity (the runtimes: `runtime.py`).

A trained classifier is kept without pickle: ``model.safetensors`` (the float32 state dict)
beside ``model.json`` (the Ultralytics model definition, class names, imgsz and the versions
it was written with); `load_classifier` rebuilds the module from the definition.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from saec.artifacts.hashing import hash_obj, sha256_file
from saec.artifacts.store import atomic_path, write_bytes_atomic
from saec.tasks.edge.config import SAVED_FORMAT, find_model_yaml, is_saved_model, read_saved_model
from saec.errors import ActionableError

log = logging.getLogger(__name__)

SAVED_MODEL = "model.json"
SAVED_WEIGHTS = "model.safetensors"
SAVE_RTOL = 1e-6  # max |logit difference| / max(1, max |logit|) between a saved model and the module it came from


class EdgeModelError(ActionableError, RuntimeError):
    """The edge model cannot be loaded, exported or run as configured."""


def ultralytics():
    """Import Ultralytics with every download and telemetry path switched off first.

    On import, Ultralytics replaces ``PIL.Image.open`` process-wide with a wrapper that,
    on a file PIL cannot identify, tries to install the ``pi-heif`` package and then fails
    with ModuleNotFoundError instead of PIL's UnidentifiedImageError. That would turn a
    corrupt image into a confusing error anywhere in the process; the original is put back.
    """
    from saec.env import configure_offline

    configure_offline()
    import ultralytics as ul
    from PIL import Image

    try:
        from ultralytics.utils import patches
    except ImportError:  # a version without the patch module: nothing to undo
        return ul
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is getattr(patches, "image_open", None):
        Image.open = original
    return ul


@dataclass
class LoadedModel:
    """A classification model ready for inference: fused, float32, eval mode, on the CPU."""

    module: Any  # torch.nn.Module returning logits
    names: dict[int, str]
    model_id: str
    source: str  # the weights file or yaml it came from
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.names)


def _read_saved(model_json: str | Path) -> tuple[dict[str, Any], Path]:
    """The metadata of a model.json written by `save_classifier`, and the path of its weights file."""
    try:
        return read_saved_model(model_json)
    except ValueError as exc:
        raise EdgeModelError(str(exc)) from None


def model_id_of(weights: str | Path, seed: int = 0) -> str:
    """Identity of a model's weights (16 hex).

    A checkpoint: the file's sha256; a saved model.json: the sha256 of it and of its
    model.safetensors; a .yaml: "yaml-" and the hash of (definition, seed, versions).
    """
    weights = str(weights)
    if is_saved_model(weights):
        _, tensors = _read_saved(weights)
        return hash_obj({"model": sha256_file(weights), "weights": sha256_file(tensors)})[:16]
    if Path(weights).suffix.lower() in (".yaml", ".yml"):
        import torch

        ul = ultralytics()
        yaml_path = find_model_yaml(weights)
        if yaml_path is None:
            raise EdgeModelError(f"model definition {weights!r} not found")
        return "yaml-" + hash_obj(
            {
                "yaml": Path(weights).name,
                "definition": sha256_file(yaml_path),
                "seed": seed,
                "torch": torch.__version__.split("+")[0],
                "ultralytics": ul.__version__,
            }
        )[:16]
    return sha256_file(weights)[:16]


def _logits_module(model: Any) -> Any:
    import torch

    class ClassifierLogits(torch.nn.Module):
        """An Ultralytics ClassificationModel in eval mode, returning the logits only."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x)
            return out[1] if isinstance(out, (tuple, list)) else out

    return ClassifierLogits(model).eval()


def load_saved(model_json: str | Path) -> Any:
    """The ClassificationModel of a saved model.json, rebuilt from its definition; nothing is unpickled."""
    import torch
    from safetensors.torch import load_file

    ultralytics()
    from ultralytics.nn.tasks import ClassificationModel

    meta, tensors = _read_saved(model_json)
    if sha256_file(tensors) != meta["weights_sha256"]:
        raise EdgeModelError(f"{tensors} is not the weights file {model_json} was written with")
    names = {int(k): str(v) for k, v in meta["names"].items()}
    with torch.random.fork_rng(devices=[]):  # the random initialisation is overwritten; the global RNG stays
        net = ClassificationModel(cfg=json.loads(json.dumps(meta["yaml"])), nc=len(names), verbose=False)
    net.load_state_dict(load_file(str(tensors)), strict=True)
    net.names = names
    return net


def load_classifier(weights: str | Path, seed: int = 0) -> LoadedModel:
    """Load an edge classifier; `weights` is one of

    * a model .yaml: built with random weights seeded by `seed`;
    * a model.json written by `save_classifier`: rebuilt from its definition, with the
      weights of the model.safetensors it names (nothing is unpickled);
    * any other file: a YOLO classification checkpoint (.pt) of the user's, loaded by Ultralytics.
    """
    import torch

    ul = ultralytics()
    weights = str(weights)
    from_yaml = Path(weights).suffix.lower() in (".yaml", ".yml")
    if Path(weights).suffix.lower() == ".safetensors":
        raise EdgeModelError(f"{weights}: load a saved edge model by its {SAVED_MODEL}")
    try:
        if is_saved_model(weights):
            yolo = None
            net = load_saved(weights)
        elif from_yaml:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                yolo = ul.YOLO(weights, task="classify")
        else:
            if not Path(weights).is_file():
                raise EdgeModelError(f"edge weights file {weights} does not exist")
            yolo = ul.YOLO(weights, task="classify")
    except EdgeModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read a checkpoint is reported with its file
        raise EdgeModelError(f"cannot load edge model from {weights}: {type(exc).__name__}: {exc}") from exc
    if yolo is not None:
        if yolo.task != "classify":
            raise EdgeModelError(f"{weights} is a {yolo.task!r} model; the edge needs a classification (-cls) model")
        net = yolo.model
    net = net.float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.fuse()
    names = {int(k): str(v) for k, v in dict(net.names).items()}
    return LoadedModel(
        module=_logits_module(net),
        names=names,
        model_id=model_id_of(weights, seed),
        source=weights,
        info={"from_yaml": from_yaml, "parameters": int(sum(p.numel() for p in net.parameters()))},
    )


def save_classifier(net: Any, imgsz: int, out_dir: str | Path) -> LoadedModel:
    """Write a ClassificationModel as out_dir/model.safetensors and out_dir/model.json; return it loaded back.

    model.safetensors holds the float32 state dict (unfused), model.json the model's
    definition (Ultralytics' `model.yaml`), class names, `imgsz`, the weights file's name and
    sha256, and the Ultralytics and torch versions. The loaded model must give `net`'s
    logits on a seeded batch, or both files are removed. `net` itself is left as it is.
    """
    import copy

    import torch
    from safetensors.torch import save_file

    ul = ultralytics()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_json, tensors = out_dir / SAVED_MODEL, out_dir / SAVED_WEIGHTS
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    with atomic_path(tensors) as tmp:
        save_file(state, str(tmp), metadata={"format": SAVED_FORMAT})
    meta = {
        "format": SAVED_FORMAT,
        "task": "classify",
        "weights": SAVED_WEIGHTS,
        "weights_sha256": sha256_file(tensors),
        "yaml": net.yaml,
        "names": {str(k): str(v) for k, v in dict(net.names).items()},
        "imgsz": int(imgsz),
        "ultralytics": ul.__version__,
        "torch": torch.__version__,
    }
    write_bytes_atomic(model_json, (json.dumps(meta, indent=2) + "\n").encode())
    try:
        loaded = load_classifier(model_json)
        reference = copy.deepcopy(net).float().eval()
        reference.fuse(verbose=False)
        x = torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want, got = _logits_module(reference)(x), loaded.module(x)
        diff = float((want - got).abs().max())
        if not diff <= SAVE_RTOL * max(1.0, float(want.abs().max())):
            raise EdgeModelError(f"the edge model saved to {out_dir} differs from the trained one by {diff:.2e} in logits")
    except BaseException:
        model_json.unlink(missing_ok=True)
        tensors.unlink(missing_ok=True)
        raise
    return loaded


class EdgeModel:
    """A classifier named by its weights; the PyTorch module is loaded only when it is needed.

    With a cached ONNX graph, inference never loads the weights into PyTorch: the class
    names come from the cache's metadata and the identity from the files' hashes.
    """

    def __init__(self, weights: str | Path, seed: int = 0, loaded: LoadedModel | None = None):
        self.weights = str(weights)
        self.seed = seed
        if loaded is None and Path(self.weights).suffix.lower() not in (".yaml", ".yml"):
            if not Path(self.weights).is_file():
                raise EdgeModelError(f"edge weights file {self.weights} does not exist")
        self.model_id = loaded.model_id if loaded is not None else model_id_of(self.weights, seed)
        self._loaded = loaded

    @classmethod
    def of(cls, model: "EdgeModel | LoadedModel") -> "EdgeModel":
        return model if isinstance(model, EdgeModel) else cls(model.source, loaded=model)

    def torch(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_classifier(self.weights, self.seed)
            if self._loaded.model_id != self.model_id:
                raise EdgeModelError(f"{self.weights} changed while it was in use")
        return self._loaded
