"""On a CUDA machine: the scoring engine selects the fast path by itself and agrees with the plain forward.

Skipped without CUDA (CI has none); run on a GPU machine with the weightless model folders
(`SAEC_SHARED` pointing at a folder holding `models/`).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED

torch = pytest.importorskip("torch")
QWEN = SHARED / "models" / "Qwen2.5-VL-7B-Instruct"
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not (QWEN / "config.json").is_file(), reason=f"{QWEN} is absent"),
]

TEXT = dict(num_hidden_layers=4)
VISION = dict(depth=8, fullatt_block_indexes=[3, 7])  # real widths, real window layout, fewer blocks


def test_engine_selects_fast_path_on_cuda_and_matches_reference(tmp_path):
    from saec.tasks.cloud.config import CloudScoreConfig
    from saec.tasks.cloud.engine import VLMScorer
    from saec.tasks.cloud.fast import build_random_vlm

    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((640, 600, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    scores = {}
    for impl in ("reference", "fast"):
        loaded = build_random_vlm(QWEN, device="cuda", dtype="bfloat16", seed=3, text_overrides=TEXT, vision_overrides=VISION)
        cfg = CloudScoreConfig(model=str(QWEN), impl=impl, resize=448, batch_size=4, progress=False)
        scorer = VLMScorer(cfg, loaded=loaded)
        assert (scorer.fast_path is not None) == (impl == "fast")
        scores[impl] = scorer.score(paths)["p_defect"]
        scorer.close()
        del scorer, loaded
        torch.cuda.empty_cache()
    diff = np.abs(scores["fast"] - scores["reference"])
    print({"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())})
    assert np.isfinite(scores["fast"]).all() and diff.max() < 0.05
