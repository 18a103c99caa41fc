"""The embedded cloud model: the shipped stand-in, fine-tuned on the synthetic SFT split, scored on
the synthetic holdout, and the stand-in as shipped scored zero-shot on the same holdout.

The stand-in (a tiny Qwen2.5-VL pretrained on a world of other categories and defect kinds,
saec.standins) is fine-tuned with the pipeline's embedded settings: `CloudTrainConfig.tiny`
(LoRA and the vision tower, 8 epochs at 140 px; turns, flips and lighting for carpet, grid and
ring), scored with the eight flips and turns on those categories, verdict at P(defect) >= 0.5.
Measured with these settings in the pipeline on a 2-core Intel Xeon (Sapphire Rapids): 88.6 %
tuned, 63.4 % zero-shot (docs/pretrained-standins.md); the goal of 90 % is not reached (the
grids' bent and broken wires are not learnt).

The figures are the README's, not this test's gates: the arithmetic of another CPU moves a
fine-tuned model. ACCURACY_FLOOR = 0.85 lies 3.6 points below the measurement and far above the
zero-shot stand-in and chance (a training that stops learning scores there); ZERO_SHOT_FLOOR =
0.58 lies 5.4 points below the shipped stand-in's measurement and five standard errors above
chance on 1,000 images (the stand-in's weights are fixed; only the CPU's arithmetic moves it).
"""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

ACCURACY_FLOOR = 0.85
ZERO_SHOT_FLOOR = 0.58


@pytest.mark.slow
def test_the_embedded_fine_tune_reaches_its_accuracy_floor(tmp_path):
    from saec.artifacts.store import read_table
    from saec.config import EMBEDDED_SYNTHETIC, load_config
    from saec.datasets.mvtec import read_mvtec
    from saec.datasets.synthetic import SyntheticConfig, generate_all
    from saec.standins import standin
    from saec.tasks.cloud.engine import VLMScorer
    from saec.tasks.cloud.train import train_vlm
    from saec.tasks.metrics import classification_metrics
    from saec.tasks.data import HoldoutConfig, build_holdout
    from saec.tasks.sft import SFTConfig, split_sft, write_jsonl

    torch.set_num_threads(2)
    generate_all(tmp_path / "synthetic", SyntheticConfig(**EMBEDDED_SYNTHETIC), workers=2)
    scan = read_mvtec(tmp_path / "synthetic" / "mvtec_ad").images
    train, _ = split_sft(scan, SFTConfig())
    sft = write_jsonl(train, tmp_path / "sft_train.jsonl")
    holdout, _ = build_holdout(scan, set(train.image_id), HoldoutConfig(), tmp_path / "holdout")

    model = standin("qwen")
    embedded = load_config(None, [])  # the pipeline's own settings for the embedded model
    cfg = embedded.cloud.train_config(str(model)).model_copy(update={"progress": False})
    t0 = time.perf_counter()
    summary = train_vlm(cfg, sft, None, tmp_path / "work", tmp_path / "out")
    train_s = time.perf_counter() - t0
    score_cfg = embedded.cloud.score_config(str(model)).model_copy(
        update={"adapter": summary["adapter_dir"], "progress": False, "threshold": embedded.routing.cloud_thr})
    scorer = VLMScorer(score_cfg)
    info = scorer.score_manifest(holdout, tmp_path / "scores.parquet")
    scores = read_table(info["path"]).set_index("image_id").loc[holdout.image_id]
    p = scores.p_defect.to_numpy()
    labels = holdout.label.to_numpy()
    metrics = classification_metrics(pd.DataFrame({"label": labels, "pred": (p >= embedded.routing.cloud_thr).astype(int),
                                                   "score": p, "branch": "cloud"}))
    # the stand-in as shipped, scored as the zero-shot baseline is
    zero_cfg = embedded.score_config(str(model), baseline=True).model_copy(update={"progress": False})
    zero = read_table(VLMScorer(zero_cfg).score_manifest(holdout, tmp_path / "zero.parquet")["path"])
    zero_acc = float(((zero.set_index("image_id").loc[holdout.image_id].p_defect.to_numpy()
                       >= embedded.routing.cloud_thr) == labels).mean())
    print(json.dumps({"train_seconds": round(train_s, 1), "steps": summary["steps"], "holdout": metrics,
                      "threshold": embedded.routing.cloud_thr, "tta": score_cfg.tta,
                      "accuracy_at_0.26": float(((p >= 0.26) == labels).mean()), "zero_shot_accuracy": zero_acc,
                      "sft_examples": summary["examples"]}, indent=2))
    assert np.isfinite(p).all()
    assert zero_acc >= ZERO_SHOT_FLOOR  # transfer from the pretraining world, not chance
    assert metrics["accuracy"] >= ACCURACY_FLOOR
