"""The embedded default cloud model, trained on the synthetic SFT split, scored on the synthetic holdout.

The goal is >= 90 % holdout accuracy after a few CPU minutes of training. The tiny model starts
from random weights and learns from the embedded default data (`EMBEDDED_SYNTHETIC`: 640 SFT
images at 128 px, defects at 6x visibility) with the embedded recipe (`CloudTrainConfig.tiny`:
24 epochs, turns and flips for carpet, grid and ring). Measured with that data and recipe:
88.6 % at threshold 0.5 with the default training seed, 80.3 % with seed 7. Capsule and carpet
are nearly perfect; good grids are often called defective, and bent or broken grid wires are
often missed. More training data, a deeper or wider vision tower, smaller attention windows,
larger LoRA ranks and larger batches were each measured without a gain beyond that spread.
The test states the goal and is expected to fail until the data or the recipe change; it fails
loudly (strict) once the goal is met.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the random-init tiny VLM reaches 80-89 % on the embedded default "
                                       "holdout, not 90 %; see the module docstring")
def test_tiny_default_reaches_the_accuracy_goal(tmp_path):
    from saec.config import EMBEDDED_SYNTHETIC
    from saec.datasets.mvtec import read_mvtec
    from saec.datasets.synthetic import SyntheticConfig, generate_all
    from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig, TinyModelConfig
    from saec.tasks.cloud.engine import VLMScorer
    from saec.tasks.cloud.tiny import build_tiny_qwen
    from saec.tasks.cloud.train import classification_metrics, train_vlm
    from saec.tasks.data import HoldoutConfig, build_holdout
    from saec.tasks.sft import SFTConfig, split_sft, write_jsonl

    torch.set_num_threads(2)
    generate_all(tmp_path / "synthetic", SyntheticConfig(**EMBEDDED_SYNTHETIC), workers=2)
    scan = read_mvtec(tmp_path / "synthetic" / "mvtec_ad").images
    train, _ = split_sft(scan, SFTConfig())
    sft = write_jsonl(train, tmp_path / "sft_train.jsonl")
    holdout, _ = build_holdout(scan, set(train.image_id), HoldoutConfig(), tmp_path / "holdout")

    model = build_tiny_qwen(tmp_path / "tiny", TinyModelConfig())
    cfg = CloudTrainConfig.tiny(model, progress=False)
    t0 = time.perf_counter()
    summary = train_vlm(cfg, sft, None, tmp_path / "work", tmp_path / "out")
    train_s = time.perf_counter() - t0
    scorer = VLMScorer(CloudScoreConfig(model=str(model), adapter=summary["adapter_dir"], resize=cfg.resize,
                                        batch_size=32, threshold=0.5, progress=False))
    scores = scorer.score(holdout.path.tolist())
    labels = holdout.label.to_numpy()
    metrics = classification_metrics(labels, scores["pred"], scores["p_defect"])
    at_seed_thr = float(((scores["p_defect"] >= 0.26) == labels).mean())
    print(json.dumps({"train_seconds": round(train_s, 1), "steps": summary["steps"], "holdout": metrics,
                      "accuracy_at_0.26": at_seed_thr, "sft_examples": summary["examples"]}, indent=2))
    assert np.isfinite(scores["p_defect"]).all()
    assert metrics["accuracy"] >= 0.9
