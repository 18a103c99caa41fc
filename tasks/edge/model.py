"""Loading and saving the edge classifier, exporting it to ONNX (cached), and the two CPU runtimes.

A trained classifier is kept without pickle: ``model.safetensors`` (the float32 state dict)
beside ``model.json`` (the Ultralytics model definition, class names, imgsz and the versions
it was written with); `load_classifier` rebuilds the module from the definition.

Both runtimes return raw logits for a float32 NCHW batch; the confidence measures are
computed from the logits afterwards, the same way for both. The ONNX graph is exported
from the fused PyTorch module with ``torch.onnx.export`` (no Ultralytics exporter, which
may try to install packages), checked numerically against PyTorch, and cached by
(model id, imgsz, opset).
"""
from __future__ import annotations

import json
import logging
import platform
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from saec.artifacts.hashing import hash_obj, sha256_file
from saec.artifacts.store import atomic_path, write_bytes_atomic, write_json_atomic
from saec.tasks.edge.config import EdgeConfig, find_model_yaml
from saec.errors import ActionableError

log = logging.getLogger(__name__)

ONNX_INPUT = "images"
ONNX_OUTPUT = "logits"
EXPORT_RTOL = 1e-4  # max |logit_ort - logit_torch| / max(1, max |logit|) accepted when a graph is exported
SAVED_FORMAT = "saec-edge-classifier"
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


def _is_saved(weights: str | Path) -> bool:
    return Path(weights).suffix.lower() == ".json"


def _read_saved(model_json: str | Path) -> tuple[dict[str, Any], Path]:
    """The metadata of a model.json written by `save_classifier`, and the path of its weights file."""
    model_json = Path(model_json)
    if not model_json.is_file():
        raise EdgeModelError(f"edge model file {model_json} does not exist")
    try:
        meta = json.loads(model_json.read_text())
    except (OSError, ValueError) as exc:
        raise EdgeModelError(f"cannot read edge model {model_json}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != SAVED_FORMAT:
        raise EdgeModelError(f"{model_json} is not an edge model written by save_classifier (format {SAVED_FORMAT!r})")
    missing = sorted({"weights", "weights_sha256", "yaml", "names"} - set(meta))
    if missing:
        raise EdgeModelError(f"edge model {model_json} lacks {missing}")
    weights = model_json.parent / meta["weights"]
    if not weights.is_file():
        raise EdgeModelError(f"the weights {weights} of edge model {model_json} do not exist")
    return meta, weights


def model_id_of(weights: str | Path, seed: int = 0) -> str:
    """Identity of a model's weights (16 hex).

    A checkpoint: the file's sha256; a saved model.json: the sha256 of it and of its
    model.safetensors; a .yaml: "yaml-" and the hash of (definition, seed, versions).
    """
    weights = str(weights)
    if _is_saved(weights):
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
        if _is_saved(weights):
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


# --------------------------------------------------------------------------- runtimes


class TorchRunner:
    name = "torch"

    def __init__(self, model: LoadedModel, threads: int):
        import torch

        self.torch = torch
        self.model = model
        self.threads = threads
        torch.set_num_threads(threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            return self.model.module(torch.from_numpy(batch)).float().numpy()


class OrtRunner:
    def __init__(self, onnx_path: Path, threads: int, name: str = "onnxruntime"):
        import onnxruntime as ort

        self.name = name
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Decoding threads share the cores: idle inference threads must sleep, not spin.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.onnx_path = onnx_path
        self.threads = threads

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: batch})[0]


def _export(model: LoadedModel, imgsz: int, opset: int, path: Path) -> str:
    import torch

    dummy = torch.rand(2, 3, imgsz, imgsz)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        kwargs = dict(
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            opset_version=opset,
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            do_constant_folding=True,
        )
        try:
            torch.onnx.export(model.module, (dummy,), str(tmp), dynamo=False, **kwargs)
            exporter = "torchscript"
        except TypeError:  # a torch without the TorchScript exporter
            torch.onnx.export(model.module, (dummy,), str(tmp), dynamo=True, external_data=False, **kwargs)
            exporter = "dynamo"
    return exporter


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def verify_onnx(
    model: LoadedModel, onnx_path: Path, imgsz: int, threads: int, n: int = 3, seed: int = 0
) -> dict[str, float]:
    """ONNX Runtime against PyTorch on a seeded batch of smooth random images.

    Returns the max |logit difference|, the largest |logit| and the max |probability
    difference|. Kernels differ between the two, so logits agree to float32 rounding
    relative to their size, not to an absolute number.
    """
    rng = np.random.default_rng(seed)
    cells = -(-imgsz // 16)  # 16-pixel blocks of random colour, plus pixel noise
    coarse = rng.random((n, 3, cells, cells), dtype=np.float32).repeat(16, axis=2).repeat(16, axis=3)
    noise = 0.1 * rng.standard_normal((n, 3, imgsz, imgsz), dtype=np.float32)
    batch = np.ascontiguousarray(np.clip(coarse[:, :, :imgsz, :imgsz] + noise, 0.0, 1.0))
    ort_logits = OrtRunner(onnx_path, threads)(batch)
    torch_logits = TorchRunner(model, threads)(batch)
    return {
        "max_logit_diff": float(np.abs(ort_logits - torch_logits).max()),
        "max_abs_logit": float(np.abs(torch_logits).max()),
        "max_prob_diff": float(np.abs(_softmax(ort_logits) - _softmax(torch_logits)).max()),
    }


def onnx_for(
    model: "EdgeModel | LoadedModel", imgsz: int, cache_dir: str | Path, opset: int = 17, threads: int = 1
) -> Path:
    """The cached ONNX graph of `model` at `imgsz`; exported and verified on first use.

    The cache key is (model id = weights hash, imgsz, opset); a metadata JSON beside the
    graph records the class names and the verification against PyTorch.
    """
    model = EdgeModel.of(model)
    cache_dir = Path(cache_dir)
    stem = f"{model.model_id}-{imgsz}-op{opset}"
    path = cache_dir / f"{stem}.onnx"
    meta_path = cache_dir / f"{stem}.json"
    if path.is_file() and meta_path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    loaded = model.torch()
    exporter = _export(loaded, imgsz, opset, path)
    check = verify_onnx(loaded, path, imgsz, threads)
    rel = check["max_logit_diff"] / max(1.0, check["max_abs_logit"])
    if not rel <= EXPORT_RTOL:
        path.unlink(missing_ok=True)
        raise EdgeModelError(
            f"the ONNX export of {loaded.source} differs from PyTorch by {check['max_logit_diff']:.2e} in logits "
            f"of size up to {check['max_abs_logit']:.3g} (accepted: {EXPORT_RTOL:.0e} relative); "
            "run with edge.runtime=torch"
        )
    import onnxruntime as ort
    import torch

    write_json_atomic(
        meta_path,
        {
            "model_id": loaded.model_id,
            "source": loaded.source,
            "imgsz": imgsz,
            "opset": opset,
            "exporter": exporter,
            "names": {str(k): v for k, v in loaded.names.items()},
            "verification_vs_torch": check,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
    )
    return path


class _Batches:
    """An ONNX Runtime CalibrationDataReader over a float32 NCHW array."""

    def __init__(self, x: np.ndarray, batch: int):
        self._it = iter([{ONNX_INPUT: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def int8_onnx_for(
    model: "EdgeModel | LoadedModel",
    imgsz: int,
    cache_dir: str | Path,
    calibration: Sequence[str | Path],
    opset: int = 17,
    threads: int = 1,
) -> Path:
    """A statically quantized (int8, per-channel QDQ) copy of the model's ONNX graph, cached.

    Activation ranges are calibrated (min/max) on `calibration` images, preprocessed as at
    inference; the cache key adds the hash of those files' bytes. The metadata records how
    far the int8 graph is from the float graph on the calibration images.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from saec.tasks.edge.preprocess import load_classify, to_nchw_float

    if not calibration:
        raise ValueError("int8 quantization needs calibration images")
    model = EdgeModel.of(model)
    fp32 = onnx_for(model, imgsz, cache_dir, opset, threads)
    cal_key = hash_obj(sorted(sha256_file(p) for p in calibration))[:12]
    stem = f"{model.model_id}-{imgsz}-op{opset}-int8-{cal_key}"
    path = Path(cache_dir) / f"{stem}.onnx"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        return path
    x = to_nchw_float(np.stack([load_classify(p, imgsz) for p in calibration]))
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        with atomic_path(path) as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(pre),
                str(out),
                _Batches(x, 8),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    ref, q = OrtRunner(fp32, threads)(x), OrtRunner(path, threads)(x)
    p_ref, p_q = _softmax(ref), _softmax(q)
    check = {
        "images": len(x),
        "max_prob_diff_vs_fp32": float(np.abs(p_ref - p_q).max()),
        "mean_abs_smax_diff_vs_fp32": float(np.abs(p_ref.max(1) - p_q.max(1)).mean()),
        "top1_agreement_vs_fp32": float((p_ref.argmax(1) == p_q.argmax(1)).mean()),
    }
    if check["top1_agreement_vs_fp32"] < 0.9:
        log.warning("int8 edge model %s agrees with fp32 on only %.0f %% of top-1 classes",
                    path.name, 100 * check["top1_agreement_vs_fp32"])
    meta = read_onnx_meta(fp32) | {
        "precision": "int8",
        "quantization": "static QDQ, per-channel int8 weights, uint8 activations, min/max calibration",
        "calibration_files": [str(p) for p in calibration],
        "verification_vs_fp32": check,
    }
    write_json_atomic(meta_path, meta)
    return path


def make_runner(
    cfg: EdgeConfig,
    model: "EdgeModel | LoadedModel",
    cache_dir: str | Path,
    calibration: Sequence[str | Path] | None = None,
) -> tuple[Any, dict[int, str], str | None]:
    """The configured runtime, the model's class names, and the reason when `auto` fell back to PyTorch.

    `calibration` (image paths) is needed for precision=int8 only.
    """
    model = EdgeModel.of(model)
    threads = cfg.resolved_threads()
    if cfg.runtime == "torch":
        loaded = model.torch()
        return TorchRunner(loaded, threads), loaded.names, None
    try:
        if cfg.precision == "int8":
            path = int8_onnx_for(model, cfg.imgsz, cache_dir, calibration or [], cfg.opset, threads)
            runner = OrtRunner(path, threads, name="onnxruntime-int8")
        else:
            path = onnx_for(model, cfg.imgsz, cache_dir, cfg.opset, threads)
            runner = OrtRunner(path, threads)
        names = {int(k): v for k, v in read_onnx_meta(path)["names"].items()}
        return runner, names, None
    except Exception as exc:  # noqa: BLE001 - auto falls back, but says why
        if cfg.runtime == "onnxruntime":
            raise
        reason = f"onnxruntime unavailable: {type(exc).__name__}: {exc}"
        log.warning("edge runtime falls back to torch (%s)", reason)
        loaded = model.torch()
        return TorchRunner(loaded, threads), loaded.names, reason


def read_onnx_meta(onnx_path: Path) -> dict[str, Any]:
    return json.loads(onnx_path.with_suffix(".json").read_text())
