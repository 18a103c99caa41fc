"""The Qwen2.5-VL fast path computes what the plain Hugging Face forward computes.

Architecture of the real Qwen2.5-VL-7B config (real vision widths, real tokenizer, processor and
chat template) at reduced depth, with a narrow language model so it runs on a CPU in seconds.
Images of 448 px (equal 8x8 windows: one attention call per block) and 512 px (resized to 504:
8x8, 8x4 and 4x4 windows: one call per window length).
"""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from conftest import MODELS, MODELS_SKIP  # noqa: E402

QWEN = MODELS / "Qwen2.5-VL-7B-Instruct"
pytestmark = pytest.mark.skipif(not (QWEN / "config.json").is_file(), reason=MODELS_SKIP)

from saec.env import configure_offline  # noqa: E402

configure_offline()

from saec.tasks.cloud.config import CloudScoreConfig  # noqa: E402
from saec.tasks.cloud.engine import VLMScorer, answer_logprobs, build_prompt_spec, encode  # noqa: E402
from saec.tasks.cloud.fast import (  # noqa: E402
    FastPathError,
    install_fast_path,
    keep_positions,
    uninstall_fast_path,
    vision_attention_groups,
)
from conftest import benchmark_module  # noqa: E402
from test_cloud_engine import assert_device_preparation_matches_processor  # noqa: E402

build_random_vlm = benchmark_module("random_vlm").build_random_vlm

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


def _scores(loaded, paths, impl, resize, **options):
    options.setdefault("batch_size", len(paths))
    cfg = CloudScoreConfig(model=str(QWEN), impl=impl, resize=resize, progress=False, decode_workers=2,
                           prefetch_batches=1, **options)
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
    assert record["installed"] == ["vision_attention_batched_windows", "patch_embed_as_matmul",
                                   "vision_metadata_per_grid", "rope_index_broadcast"]
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
    # same-size batches: the positions of one row, computed once per image size and batch size
    assert (record["stats"]["rope_index_broadcast"], record["stats"]["rope_index_per_row"]) == (0, 2)
    processor_prepared = _scores(loaded, images[448], "fast", 448, prepare_on_device=False)
    np.testing.assert_allclose(processor_prepared["p_defect"], fast[448]["p_defect"], atol=1e-6)
    assert record["stats"]["rope_index_broadcast"] >= 1  # identical rows took the broadcast
    built = record["stats"]["vision_metadata_built"]
    one_by_one = _scores(loaded, images[448], "fast", 448, batch_size=1)  # two batches, one grid tensor
    np.testing.assert_allclose(one_by_one["p_defect"], fast[448]["p_defect"], atol=1e-6)
    assert record["stats"]["vision_metadata_built"] == built + 1 and record["stats"]["vision_metadata_reused"] >= 1
    with pytest.raises(FastPathError, match="already installed"):
        install_fast_path(model)
    with pytest.raises(ValueError, match="carries the fast path"):  # a patched model cannot serve as reference
        _scores(loaded, images[448], "reference", 448)
    uninstall_fast_path(model)
    with torch.inference_mode():
        again = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    assert torch.equal(again, ref)  # the library's code runs again


@pytest.mark.parametrize("resize", [448, 512])  # 448: no resize by the processor; 512: resized to 504
def test_device_preparation_equals_the_real_processor(images, resize):
    scorer = VLMScorer(CloudScoreConfig(model=str(QWEN), resize=resize, batch_size=2, progress=False),
                       loaded=_loaded())
    try:
        assert_device_preparation_matches_processor(scorer, images[448] + images[512])
    finally:
        scorer.close()


def test_fused_language_layers_match_library_forward(images):
    """The fused decoder layer and the kept-positions last layer (run uncompiled on the CPU) give the
    library's answer log-probabilities, with equal rows and with left padding (the 4-D mask path);
    generation with a KV cache runs the library's layers."""
    loaded = _loaded()
    model, proc = loaded.model, loaded.processor
    proc.tokenizer.padding_side = "left"
    spec = build_prompt_spec(proc)
    pics = [Image.open(p).convert("RGB").resize((448, 448)) for p in images[448]]
    pics.append(Image.open(images[512][0]).convert("RGB").resize((336, 448)))  # fewer image tokens: padding
    batches = {"equal": encode(proc, loaded.family, [spec.prefix] * 2, pics[:2]),
               "padded": encode(proc, loaded.family, [spec.prefix] * 3, pics)}
    assert not bool(batches["padded"]["attention_mask"].all())
    with torch.inference_mode():
        ref = {k: answer_logprobs(model, b, spec, fast=False) for k, b in batches.items()}
        generated = model.generate(**batches["equal"], max_new_tokens=3, do_sample=False)
    record = install_fast_path(model, compile_vision=True, compile_language=True, compiler=lambda fn: fn)
    assert {"vision_norm_rotary_mlp_compiled", "language_layers_compiled"} <= set(record["installed"])
    state = record["language"]
    with torch.inference_mode():
        got = {k: answer_logprobs(model, b, spec, fast=True) for k, b in batches.items()}
        assert state["fast_calls"] == 2 * TEXT["num_hidden_layers"] and state["library_calls"] == 0
        b = batches["equal"]
        positions = torch.tensor([[b["input_ids"].shape[1] - 1]] * 2)
        with keep_positions(model, positions) as kept:
            h = model.model(**{k: v for k, v in b.items()}, use_cache=False).last_hidden_state
        assert kept.trimmed and h.shape[:2] == (2, 1)
        again = model.generate(**batches["equal"], max_new_tokens=3, do_sample=False)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-4, rtol=1e-4)
    assert state["library_calls"] > 0 and torch.equal(again, generated)  # the cached steps took the library path
    uninstall_fast_path(model)
    assert all("forward" not in layer.__dict__ for layer in model.model.language_model.layers)


def test_llava_is_left_untouched():
    folder = MODELS / "llava-1.5-7b-hf"
    if not (folder / "config.json").is_file():
        pytest.skip(MODELS_SKIP)
    from transformers import AutoConfig, LlavaForConditionalGeneration

    cfg = AutoConfig.from_pretrained(folder)
    cfg.text_config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=32064))
    cfg.vision_config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4))
    model = LlavaForConditionalGeneration._from_config(cfg)
    record = install_fast_path(model)
    assert record["installed"] == [] and "llava" in record["skipped"]["all"]
