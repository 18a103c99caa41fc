"""The edge classifier's two CPU runtimes (PyTorch and ONNX Runtime), the ONNX export (checked
numerically against PyTorch and cached by model id, imgsz and opset) and its int8 variant.

Both runtimes return raw logits for a float32 NCHW batch; the confidence measures are
computed from the logits afterwards, the same way for both. The graph is exported from the
fused PyTorch module with ``torch.onnx.export`` (no Ultralytics exporter, which may try to
install packages).
"""
from __future__ import annotations

import json
import logging
import platform
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from saec.artifacts.hashing import hash_obj, sha256_file
from saec.artifacts.store import atomic_path, write_json_atomic
from saec.tasks.edge.config import EdgeConfig

from saec.tasks.edge.model import EdgeModel, EdgeModelError, LoadedModel

log = logging.getLogger(__name__)

ONNX_INPUT = "images"
ONNX_OUTPUT = "logits"
EXPORT_RTOL = 1e-4  # max |logit_ort - logit_torch| / max(1, max |logit|) accepted when a graph is exported
# One export or quantization at a time in a process: torch.onnx.export fails when two threads run it
# at once (shards of the edge stage may run side by side in one process).
_EXPORT_LOCK = threading.RLock()


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
    with _EXPORT_LOCK:
        if path.is_file() and meta_path.is_file():  # another thread exported it meanwhile
            return path
        return _export_verified(model, imgsz, cache_dir, opset, threads, path, meta_path)


def _export_verified(model: EdgeModel, imgsz: int, cache_dir: Path, opset: int, threads: int, path: Path,
                     meta_path: Path) -> Path:  # fmt: skip
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
    with _EXPORT_LOCK:
        if not (path.is_file() and meta_path.is_file()):  # another thread may have quantized it meanwhile
            _quantize(fp32, path, meta_path, imgsz, calibration, threads)
    return path


def _quantize(fp32: Path, path: Path, meta_path: Path, imgsz: int, calibration: Sequence[str | Path], threads: int) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from saec.tasks.edge.preprocess import load_classify, to_nchw_float

    cache_dir = path.parent
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
