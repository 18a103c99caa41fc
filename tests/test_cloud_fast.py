"""The Qwen2.5-VL fast path computes what the plain Hugging Face forward computes.

Architecture of the real Qwen2.5-VL-7B config (real vision widths, real tokenizer, processor and
chat template) at reduced depth, with a narrow language model so it runs on a CPU in seconds.
Images of 448 px (equal 8x8 windows: one attention call per block) and 512 px (resized to 504:
8x8, 8x4 and 4x4 windows: one call per window length).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

SHARED = Path(os.environ.get("SAEC_SHARED", Path(__file__).resolve().parents[2] / "shared"))
QWEN = SHARED / "models" / "Qwen2.5-VL-7B-Instruct"
pytestmark = pytest.mark.skipif(not (QWEN / "config.json").is_file(), reason=f"{QWEN} is absent")

from saec.env import configure_offline  # noqa: E402

configure_offline()

from saec.tasks.cloud.config import CloudScoreConfig  # noqa: E402
from saec.tasks.cloud.engine import VLMScorer  # noqa: E402
from saec.tasks.cloud.fast import (  # noqa: E402
    FastPathError,
    build_random_vlm,
    install_fast_path,
    uninstall_fast_path,
    vision_attention_groups,
)

TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],
                                                    "rope_theta": 1e6})
VISION = dict(depth=2, fullatt_block_indexes=[1], out_hidden_size=256, hidden_size=320, intermediate_size=856,
              num_heads=4)  # head dimension 80 and window layout as in the real tower


@pytest.fixture(scope="module", autouse=True)
def _threads(two_torch_threads):  # every test of this module runs with two torch threads
    yield


def _loaded():
    return build_random_vlm(QWEN, text_overrides=TEXT, vision_overrides=VISION, seed=1)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[int, list[str]]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("imgs")
    out: dict[int, list[str]] = {}
    for size in (448, 512):
        out[size] = []
        for i in range(2):
            arr = (rng.random((size + 37, size + 11, 3)) * 255).astype(np.uint8)
            p = root / f"{size}_{i}.png"
            Image.fromarray(arr).save(p)
            out[size].append(str(p))
    return out


def _scores(loaded, paths, impl, resize):
    cfg = CloudScoreConfig(model=str(QWEN), impl=impl, resize=resize, batch_size=len(paths),
                           progress=False, decode_workers=2, prefetch_batches=1)
    scorer = VLMScorer(cfg, loaded=loaded)
    try:
        return scorer.score(paths)
    finally:
        scorer.close()


def test_window_groups_equal_and_mixed():
    equal = vision_attention_groups(torch.tensor([0, 64, 128, 192]))
    assert [(g.length, g.count, g.index) for g in equal] == [(64, 3, None)]
    mixed = vision_attention_groups(torch.tensor([0, 64, 96, 160, 176]))
    assert [(g.length, g.count) for g in mixed] == [(16, 1), (32, 1), (64, 2)]
    assert mixed[2].index[:, 0].tolist() == [0, 96] and mixed[2].index[1, -1].item() == 159
    assert mixed[0].index.tolist() == [list(range(160, 176))]


def test_vision_tower_and_p_defect_match_plain_forward(images):
    loaded = _loaded()
    model = loaded.model
    plain = {s: _scores(loaded, images[s], "reference", s) for s in (448, 512)}

    # vision tower alone on a 504 px batch (mixed window lengths), plain vs fast
    proc = loaded.processor.image_processor
    batch = proc(images=[Image.open(p).convert("RGB").resize((512, 512)) for p in images[512]], return_tensors="pt")
    with torch.inference_mode():
        ref = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    record = install_fast_path(model)
    assert record["installed"] == ["vision_attention_batched_windows", "patch_embed_as_matmul", "rope_index_broadcast"]
    with torch.inference_mode():
        got = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-5, rel

    fast = {s: _scores(loaded, images[s], "fast", s) for s in (448, 512)}
    for s in (448, 512):
        np.testing.assert_allclose(fast[s]["logit_0"], plain[s]["logit_0"], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(fast[s]["logit_1"], plain[s]["logit_1"], atol=2e-4, rtol=1e-4)
        assert np.abs(fast[s]["p_defect"] - plain[s]["p_defect"]).max() < 1e-4
        assert not np.allclose(fast[s]["logit_0"], fast[s]["logit_1"])  # the logits carry the images
    assert record["stats"]["rope_index_broadcast"] >= 2  # identical rows took the broadcast
    with pytest.raises(FastPathError, match="already installed"):
        install_fast_path(model)
    uninstall_fast_path(model)
    with torch.inference_mode():
        again = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    assert torch.equal(again, ref)  # the library's code runs again


def test_llava_is_left_untouched():
    folder = SHARED / "models" / "llava-1.5-7b-hf"
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} is absent")
    from transformers import AutoConfig, LlavaForConditionalGeneration

    cfg = AutoConfig.from_pretrained(folder)
    cfg.text_config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=32064))
    cfg.vision_config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4))
    model = LlavaForConditionalGeneration._from_config(cfg)
    record = install_fast_path(model)
    assert record["installed"] == [] and "llava" in record["skipped"]["all"]
