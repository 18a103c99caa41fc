"""On a CUDA machine: the scoring engine selects the fast path by itself (batched vision windows,
compiled vision blocks and decoder layers, pixels prepared on the GPU) and agrees with the plain
forward.

Skipped without CUDA; run it on a GPU machine with SAEC_MODELS_DIR naming the folder that holds
the published (weightless) model folders.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import MODELS, MODELS_SKIP

torch = pytest.importorskip("torch")
QWEN = MODELS / "Qwen2.5-VL-7B-Instruct"
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not (QWEN / "config.json").is_file(), reason=MODELS_SKIP),
]

TEXT = dict(num_hidden_layers=4)
VISION = dict(depth=8, fullatt_block_indexes=[3, 7])  # real widths, real window layout, fewer blocks


def test_engine_selects_fast_path_on_cuda_and_matches_reference(tmp_path):
    from saec.tasks.cloud.config import CloudScoreConfig
    from saec.tasks.cloud.engine import VLMScorer
    from conftest import benchmark_module

    build_random_vlm = benchmark_module("random_vlm").build_random_vlm

    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((640, 600, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    scores = {}
    for impl in ("reference", "fast"):
        loaded = build_random_vlm(QWEN, device="cuda", dtype="bfloat16", seed=3, text_overrides=TEXT, vision_overrides=VISION)
        for resize in (448, 512):  # 512: the processor's resize to 504 is reproduced in the decode threads
            cfg = CloudScoreConfig(model=str(QWEN), impl=impl, resize=resize, batch_size=4, progress=False)
            scorer = VLMScorer(cfg, loaded=loaded)
            assert (scorer.fast_path is not None) == (impl == "fast")
            assert (scorer._static is not None) == (impl == "fast")  # token ids once, pixels made on the GPU
            scores[impl, resize] = scorer.score(paths)["p_defect"]
            if impl == "fast":
                assert {"vision_norm_rotary_mlp_compiled", "language_layers_compiled"} <= set(scorer.fast_path["installed"])
                assert scorer.fast_path["language"]["fast_calls"] > 0
                assert scorer.fast_path["language"]["library_calls"] == 0
                assert scorer.fast_path["stats"]["vision_metadata_reused"] > 0  # one grid tensor per batch size
            scorer.close()
            del scorer
        del loaded
        torch.cuda.empty_cache()
    for resize in (448, 512):
        diff = np.abs(scores["fast", resize] - scores["reference", resize])
        print({"resize": resize, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())})
        assert np.isfinite(scores["fast", resize]).all() and diff.max() < 0.05
