"""The edge branch: a YOLO11 classifier on the CPU, its confidence measures and verdicts.

Plain functions (no Prefect): `train_edge` trains the supervised two-class model,
`calibrate_thresholds` derives the published run's thresholds from good images, `predict_edge`
writes the `edge_predictions` table.
"""
from saec.tasks.edge.config import EdgeConfig, EdgeTrainConfig, Thresholds
from saec.tasks.edge.measures import (
    Measures,
    rule_good,
    rule_verdict,
    softmax_measures,
    thresholds_from_measures,
)
from saec.tasks.edge.model import EdgeModel, EdgeModelError, load_classifier, model_id_of
from saec.tasks.edge.runtime import int8_onnx_for, onnx_for
from saec.tasks.edge.predict import calibrate_thresholds, predict_edge, run_edge
from saec.tasks.edge.train import build_imagefolder, read_sft_jsonl, train_edge

__all__ = [
    "EdgeConfig",
    "EdgeModel",
    "EdgeModelError",
    "EdgeTrainConfig",
    "Measures",
    "Thresholds",
    "build_imagefolder",
    "calibrate_thresholds",
    "int8_onnx_for",
    "load_classifier",
    "model_id_of",
    "onnx_for",
    "predict_edge",
    "read_sft_jsonl",
    "rule_good",
    "rule_verdict",
    "run_edge",
    "softmax_measures",
    "thresholds_from_measures",
    "train_edge",
]
