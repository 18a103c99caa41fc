"""The embedded tiny Qwen2.5-VL, model loading and the scoring engine, on real files."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from saec.artifacts.store import read_table  # noqa: E402
from saec.prompts import ANSWER_PREFIX, chat_messages  # noqa: E402
from saec.tasks.cloud.config import CloudScoreConfig, ModelLoadConfig, TinyModelConfig  # noqa: E402
from saec.tasks.cloud.engine import VLMScorer, build_prompt_spec, encode, last_real_index  # noqa: E402
from saec.tasks.cloud.explain import STATUS_INVALID, STATUS_OK, parse_explanation  # noqa: E402
from saec.tasks.cloud.images import UnreadableImageError, dihedral_views, five_crops, load_rgb  # noqa: E402
from saec.tasks.cloud.models import ModelLoadError, load_vlm, model_identity, weight_files  # noqa: E402
from saec.tasks.cloud.tiny import build_tiny_qwen  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _threads(two_torch_threads):  # every test of this module runs with two torch threads
    yield


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Images of different sizes and modes (RGB, grey, 16-bit grey, palette)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    shapes = [(120, 100, 3), (64, 200, 3), (150, 150), (90, 60, 3), (112, 112, 3), (200, 80)]
    for i, shape in enumerate(shapes):
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        path = root / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    Image.fromarray((rng.integers(0, 65535, (80, 80))).astype(np.uint16)).save(root / "img16.png")
    Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)).convert("P").save(root / "pal.png")
    paths += [root / "img16.png", root / "pal.png"]
    return paths


# --------------------------------------------------------------------------- the tiny model


def test_tiny_folder_loads_like_the_real_one(tiny):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "chat_template.json", "preprocessor_config.json", "generation_config.json"} <= names
    processor = AutoProcessor.from_pretrained(tiny)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny)
    tok = processor.tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer"
    for special in ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>"]:
        ids = tok(special).input_ids
        assert len(ids) == 1 and ids[0] >= len(json.loads((tiny / "vocab.json").read_text()))
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.get_text_config().vocab_size >= len(tok)
    # "0" and "1" are single tokens right after the answer prefix
    for label in "01":
        assert tok(ANSWER_PREFIX + label).input_ids[:-1] == tok(ANSWER_PREFIX).input_ids
    # our chat template renders Qwen's structure
    text = processor.apply_chat_template(chat_messages("x.png", 1), tokenize=False)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" in text
    assert text.endswith("<|im_start|>assistant\nLabel: 1<|im_end|>\n")


def test_tiny_is_deterministic(tiny, tmp_path):
    from safetensors.torch import load_file

    again = build_tiny_qwen(tmp_path / "again", TinyModelConfig())
    other = build_tiny_qwen(tmp_path / "other", TinyModelConfig(seed=1))
    for name in ["vocab.json", "merges.txt", "config.json", "tokenizer_config.json"]:
        assert (again / name).read_bytes() == (tiny / name).read_bytes()
    a, b, c = (load_file(str(p / "model.safetensors")) for p in (tiny, again, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)
    assert model_identity(tiny) == model_identity(again) != model_identity(other)


def test_tiny_visual_tokens_follow_image_size(tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny)
    cfg = TinyModelConfig()
    img = Image.new("RGB", (500, 500))
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[img], return_tensors="pt")
    side = cfg.image_size // cfg.patch_size
    assert enc["image_grid_thw"].tolist() == [[1, side, side]]
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == (side // cfg.spatial_merge_size) ** 2


def test_tiny_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        TinyModelConfig(image_size=100)
    with pytest.raises(ValueError, match="divisible"):
        TinyModelConfig(hidden_size=130)


# --------------------------------------------------------------------------- loading


def test_weightless_folder_names_missing_shards(tmp_path, tiny):
    folder = tmp_path / "weightless"
    shutil.copytree(tiny, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_vlm(ModelLoadConfig(model=str(folder)))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelLoadError, match="model-00001-of-00002.safetensors, model-00002-of-00002.safetensors"):
        weight_files(folder)


def test_missing_model_and_unknown_family(tmp_path, tiny):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vlm(ModelLoadConfig(model=str(tmp_path / "nowhere")))
    with pytest.raises(ModelLoadError, match="Hugging Face cache"):
        load_vlm(ModelLoadConfig(model="some-org/not-cached-model"))
    folder = tmp_path / "other"
    shutil.copytree(tiny, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="supports"):
        load_vlm(ModelLoadConfig(model=str(folder)))


def test_config_validation_fails_early():
    with pytest.raises(ValueError, match="device"):
        CloudScoreConfig(model="x", device="gpu")
    with pytest.raises(ValueError):
        CloudScoreConfig(model="x", threshold=1.5)
    with pytest.raises(ValueError):
        CloudScoreConfig(model="x", tta="ten_crop")
    with pytest.raises(ValueError, match="extra"):
        CloudScoreConfig(model="x", batchsize=3)
    assert CloudScoreConfig(model="x").model_dump()["threshold"] == 0.26


# --------------------------------------------------------------------------- images


def test_images_decode_and_fail_by_name(images, tmp_path):
    for p in images:
        im = load_rgb(p, 56)
        assert im.mode == "RGB" and im.size == (56, 56)
    sixteen = np.asarray(load_rgb(images[-2], None))
    assert sixteen.max() > 200  # 16-bit range mapped onto 8 bits, not clipped to white or black
    bad = tmp_path / "broken.png"
    bad.write_bytes(images[0].read_bytes()[:200])
    with pytest.raises(UnreadableImageError, match="broken.png"):
        load_rgb(bad, 56)
    with pytest.raises(UnreadableImageError, match="file not found"):
        load_rgb(tmp_path / "missing.png", 56)
    crops = five_crops(Image.new("RGB", (100, 60)), 40)
    assert [c.size for c in crops] == [(40, 40)] * 5
    small = five_crops(Image.new("RGB", (30, 20)), 40)
    assert [c.size for c in small] == [(40, 40)] * 5


# --------------------------------------------------------------------------- scoring


def test_prompt_spec_of_the_tiny_model(tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny)
    spec = build_prompt_spec(processor)
    generation = processor.apply_chat_template(chat_messages("image")[:1], tokenize=False, add_generation_prompt=True)
    assert spec.prefix == generation + ANSWER_PREFIX and spec.matches_generation_prompt
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(list(spec.label_ids)) == ["0", "1"]
    assert spec.n_answer_prefix_tokens == len(tok(ANSWER_PREFIX).input_ids)


def test_last_real_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_real_index(mask).tolist() == [2, 4, 4]


def test_fast_equals_reference_with_padding_and_batches(tiny, images):
    # resize=None keeps the images' own aspect ratios: rows get different lengths, so padding is real
    fast = VLMScorer(CloudScoreConfig(model=str(tiny), resize=None, batch_size=3, impl="fast", progress=False))
    ref = VLMScorer(CloudScoreConfig(model=str(tiny), resize=None, batch_size=1, impl="reference", progress=False),
                    loaded=fast.loaded)
    with ThreadPoolExecutor(1) as pool:
        prepared = fast._prepare(0, [str(p) for p in images[:3]], pool)
    lengths = prepared.batch["attention_mask"].sum(1)
    assert lengths.unique().numel() > 1, "the test images must give rows of different lengths"
    left = fast.score(images)
    fast.processor.tokenizer.padding_side = "right"
    right = fast.score(images)
    single = ref.score(images)
    np.testing.assert_allclose(left["p_defect"], single["p_defect"], atol=1e-5)
    np.testing.assert_allclose(right["p_defect"], single["p_defect"], atol=1e-5)
    assert left["p_defect"].std() > 0  # different images, different scores
    assert left["batch_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert left["batch_size"].tolist() == [3, 3, 3, 3, 3, 3, 2, 2]
    # one compute time per batch, shared by its images
    for b in range(3):
        assert len(set(left["batch_seconds"][left["batch_index"] == b])) == 1
    assert (left["batch_seconds"] > 0).all()


def assert_device_preparation_matches_processor(scorer: VLMScorer, paths) -> None:
    """The scorer's processor-free batch is the processor's: the same token tensors and grid, the
    model's own 3-D positions, and pixel_values within float32 rounding (uint8 pixels made into
    patches by torch operations)."""
    assert scorer._static is not None, "same-size images should not need the processor"
    with ThreadPoolExecutor(2) as pool:
        prepared = scorer._prepare(0, [str(p) for p in paths], pool)
    assert prepared.batch["pixels_uint8"].dtype == torch.uint8 and "pixel_values" not in prepared.batch
    got = scorer.device_batch(prepared.batch)
    images = [load_rgb(p, scorer.cfg.resize) for p in paths]
    ref = encode(scorer.processor, scorer.family, [scorer.spec.prefix] * len(images), images)
    assert set(got) == set(ref) | {"position_ids"}
    for key in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(got[key].cpu(), ref[key]), key
    positions, _ = scorer._base.model.get_rope_index(  # what the model computes for the processor's batch
        ref["input_ids"], image_grid_thw=ref["image_grid_thw"], attention_mask=ref["attention_mask"],
        mm_token_type_ids=ref["mm_token_type_ids"])
    assert torch.equal(got["position_ids"].cpu(), positions)
    pixels, expected = got["pixel_values"].float().cpu(), ref["pixel_values"]
    assert pixels.shape == expected.shape
    assert float((pixels - expected).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(expected.abs().max())


@pytest.mark.parametrize("resize", [112, 512])  # the tiny processor's own size, and one it resizes down
def test_device_preparation_equals_the_processor(tiny, images, resize):
    scorer = VLMScorer(CloudScoreConfig(model=str(tiny), resize=resize, batch_size=4, progress=False))
    try:
        assert_device_preparation_matches_processor(scorer, images)  # RGB, grey, 16-bit and palette files
        off = VLMScorer(CloudScoreConfig(model=str(tiny), resize=resize, prepare_on_device=False, progress=False),
                        loaded=scorer.loaded)
        assert off._static is None
        np.testing.assert_allclose(scorer.score(images)["p_defect"], off.score(images)["p_defect"], atol=1e-6)
        off.close()
    finally:
        scorer.close()
    unsized = VLMScorer(CloudScoreConfig(model=str(tiny), resize=None, progress=False), loaded=scorer.loaded)
    assert unsized._static is None  # images keep their own sizes: the processor prepares each batch
    unsized.close()


def test_fast_path_never_builds_full_vocabulary_logits(tiny, images, monkeypatch):
    scorer = VLMScorer(CloudScoreConfig(model=str(tiny), resize=112, batch_size=4, progress=False))
    head = scorer._base.get_output_embeddings()
    calls = []
    monkeypatch.setattr(head, "forward", lambda x: calls.append(x.shape) or torch.zeros(*x.shape[:-1], head.out_features))
    out = scorer.score(images[:4])
    assert calls == [] and np.isfinite(out["p_defect"]).all()


def test_threshold_and_softmax(tiny, images):
    scorer = VLMScorer(CloudScoreConfig(model=str(tiny), resize=112, batch_size=4, threshold=0.26, progress=False))
    out = scorer.score(images)
    z = np.stack([out["logit_0"], out["logit_1"]], 1).astype(np.float64)
    softmax = np.exp(z[:, 1]) / np.exp(z).sum(1)
    np.testing.assert_allclose(out["p_defect"], softmax, rtol=1e-6)
    assert (out["pred"] == (out["p_defect"] >= 0.26)).all()


def _tta_scorers(tiny: Path, tta: str) -> tuple[VLMScorer, VLMScorer]:
    """The fast and the reference scorer at 56 px with this test-time augmentation, on one loaded model."""
    fast = VLMScorer(CloudScoreConfig(model=str(tiny), resize=56, batch_size=3, tta=tta, progress=False))
    ref = VLMScorer(CloudScoreConfig(model=str(tiny), resize=56, batch_size=2, tta=tta, impl="reference",
                                     progress=False), loaded=fast.loaded)
    return fast, ref


def _save_all(pictures: list[Image.Image], folder: Path, stem: str) -> list[Path]:
    paths = [folder / f"{stem}{i}.png" for i in range(len(pictures))]
    for picture, path in zip(pictures, paths):
        picture.save(path)
    return paths


def test_five_crop_tta_fast_equals_reference(tiny, images, tmp_path):
    fast, ref = _tta_scorers(tiny, "five_crop")
    a, b = fast.score(images[:5]), ref.score(images[:5])
    np.testing.assert_allclose(a["p_defect"], b["p_defect"], atol=1e-5)
    np.testing.assert_allclose(a["logit_0"], b["logit_0"], rtol=1e-4)
    assert (a["logit_0"] < 0).all() and (a["logit_1"] < 0).all()  # summed log-probabilities
    # TTA of one image = mean over its five crops: score each crop saved as a 56 px file (whose
    # five crops are then all the crop itself) and average
    per_crop = fast.score(_save_all(five_crops(load_rgb(images[0], None), 56), tmp_path, "crop"))
    np.testing.assert_allclose(per_crop["logit_0"].mean(), a["logit_0"][0], rtol=1e-5)
    np.testing.assert_allclose(per_crop["logit_1"].mean(), a["logit_1"][0], rtol=1e-5)


def test_dihedral_tta_is_the_mean_over_flips_and_turns(tiny, images, tmp_path):
    fast, ref = _tta_scorers(tiny, "dihedral")
    a, b = fast.score(images[:4]), ref.score(images[:4])
    np.testing.assert_allclose(a["p_defect"], b["p_defect"], atol=1e-5)
    np.testing.assert_allclose(a["logit_1"], b["logit_1"], rtol=1e-4, atol=1e-5)
    # one image's score = the mean label logits of its eight views, each scored on its own
    per_view = fast.score(_save_all(dihedral_views(load_rgb(images[0], 56)), tmp_path, "view"), tta="none")
    assert np.ptp(per_view["logit_1"] - per_view["logit_0"]) > 1e-4  # the views do score differently
    np.testing.assert_allclose(per_view["logit_0"].mean(), a["logit_0"][0], rtol=1e-5)
    np.testing.assert_allclose(per_view["logit_1"].mean(), a["logit_1"][0], rtol=1e-5)
    np.testing.assert_allclose(per_view["logit_0"][0], fast.score(images[:1], tta="none")["logit_0"][0], rtol=1e-5)
    with pytest.raises(ValueError, match="tta"):
        fast.score(images[:1], tta="ten_crop")


def test_manifest_tta_applies_to_the_listed_categories_only(tiny, images, tmp_path):
    import pandas as pd

    scorer = VLMScorer(CloudScoreConfig(model=str(tiny), resize=56, batch_size=3, tta="dihedral",
                                        tta_categories=("grid",), progress=False))
    paths = [str(p) for p in images[:5]]
    category = ["grid", "capsule", "grid", "capsule", "grid"]
    manifest = pd.DataFrame({"image_id": [f"id{i}" for i in range(5)], "path": paths, "category": category})
    info = scorer.score_manifest(manifest, tmp_path / "scores.parquet")
    table = read_table(tmp_path / "scores.parquet")
    grid = np.array(category) == "grid"
    assert info["rows"] == 5 and list(table.image_id) == list(manifest.image_id)
    assert table.tta.tolist() == ["dihedral" if g else "none" for g in grid]
    assert table.score_kind.tolist() == ["label_logit_mean" if g else "label_logit" for g in grid]
    turned, plain = scorer.score(paths), scorer.score(paths, tta="none")
    np.testing.assert_allclose(table.p_defect, np.where(grid, turned["p_defect"], plain["p_defect"]), rtol=1e-6)
    # without a category column no row is listed: every image is scored once
    scorer.score_manifest(manifest.drop(columns="category"), tmp_path / "plain.parquet")
    assert (read_table(tmp_path / "plain.parquet").tta == "none").all()


def test_unreadable_image_stops_scoring_with_its_name(tiny, images, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png at all")
    scorer = VLMScorer(CloudScoreConfig(model=str(tiny), resize=112, batch_size=2, progress=False))
    with pytest.raises(UnreadableImageError, match="corrupt.png"):
        scorer.score([images[0], images[1], images[2], bad, images[3]])


def test_score_manifest_writes_the_declared_table(tiny, images, tmp_path):
    import pandas as pd

    scorer = VLMScorer(CloudScoreConfig(model=str(tiny), resize=112, batch_size=4, threshold=0.0, explain=True,
                                        explain_max_new_tokens=8, explain_batch_size=3, progress=False))
    manifest = pd.DataFrame({"image_id": [f"id{i}" for i in range(5)], "path": [str(p) for p in images[:5]],
                             "source_path": [f"/data/{i}.jpg" if i != 2 else None for i in range(5)]})
    info = scorer.score_manifest(manifest, tmp_path / "scores.parquet")
    table = read_table(tmp_path / "scores.parquet")
    assert info["rows"] == 5 and list(table.image_id) == list(manifest.image_id)
    assert table.source_path.tolist() == manifest.source_path.tolist()  # the user's file, null where unknown
    assert (table.model_id == model_identity(tiny)).all() and table.adapter_id.isna().all()
    assert "pred" not in table and info["explain_threshold"] == 0.0  # P(defect) only; verdicts are the decisions'
    # threshold 0: every image is a defect verdict and gets an explanation
    # an untrained model writes no valid JSON: every explanation is recorded as invalid, with its reason
    assert (table.explain_status == STATUS_INVALID).all() and table.explain_error.notna().all()
    assert table.explain_raw.notna().all() and table.explain_bboxes.isna().all()


def test_explanation_parsing_and_validation():
    ok = parse_explanation('Sure: {"bboxes": [[1, 2, 30, 40]], "desc": "a scratch"} done', 100, 100)
    assert ok.status == STATUS_OK and ok.explanation.bboxes == [[1, 2, 30, 40]] and ok.explanation.desc == "a scratch"
    nested = parse_explanation('{"desc": "brace } in text", "bboxes": []}')
    assert nested.status == STATUS_OK and nested.explanation.desc == "brace } in text"
    cases = {
        "no json here": "no JSON object",
        '{"bboxes": [[1, 2, 3]], "desc": "x"}': "4",
        '{"bboxes": [[5, 2, 3, 9]], "desc": "x"}': "ordered",
        '{"bboxes": [], "desc": "  "}': "empty",
        '{"bboxes": [[0, 0, 300, 10]], "desc": "x"}': "outside",
        '{"bboxes": [], "desc": "x", "score": 1}': "Extra",
        '{"bboxes": [[0, 0, 1, 1]]}': "desc",
        '{"bboxes": [[0, 0, 1, 1]], "desc": "x"': "no JSON object",
    }
    for text, reason in cases.items():
        parsed = parse_explanation(text, 100, 100)
        assert parsed.status == STATUS_INVALID and parsed.explanation is None
        assert reason.lower() in parsed.error.lower(), (text, parsed.error)


def test_scoring_spread_over_two_processes_merges_shards_in_manifest_order(tiny, images, tmp_path):
    """Two devices (here two CPU processes): each scores a contiguous shard; the merged table is the
    one-process table, row for row, with the shards recorded."""
    import pandas as pd

    from saec.tasks.cloud.parallel import resolve_devices, score_manifest_sharded, shard_bounds

    paths = [str(p) for p in images] * 2  # 16 rows: shards of 8
    manifest = pd.DataFrame({"image_id": [f"id{i:02d}" for i in range(len(paths))], "path": paths})
    cfg = CloudScoreConfig(model=str(tiny), resize=56, batch_size=3, device="cpu", dtype="float32", progress=False)
    VLMScorer(cfg).score_manifest(manifest, tmp_path / "one.parquet")
    two = cfg.model_copy(update={"devices": ("cpu", "cpu")})
    info = score_manifest_sharded(two, manifest, tmp_path / "two.parquet")
    one, merged = read_table(tmp_path / "one.parquet"), read_table(tmp_path / "two.parquet")
    assert list(merged.image_id) == list(manifest.image_id) and list(merged.path) == paths
    assert merged.source_path.isna().all()  # a manifest without source files: null, in every shard
    np.testing.assert_allclose(merged.p_defect, one.p_defect, rtol=1e-5, atol=1e-6)
    assert info["devices"] == ["cpu", "cpu"] and [s["rows"] for s in info["shards"]] == [9, 7]  # batches of 3
    assert info["rows"] == 16 and not list(tmp_path.glob(".shards-*"))  # the shards' folder is gone
    assert shard_bounds(5, 3) == [(0, 2), (2, 3), (3, 5)] and shard_bounds(1, 4) == [(0, 1)]
    assert shard_bounds(16, 2, 3) == [(0, 9), (9, 16)] and shard_bounds(24, 4, 8) == [(0, 8), (8, 16), (16, 24)]
    assert resolve_devices(cfg) == ["cpu"]
    # the scores are the same, but the stage's measured time is the devices': they key it
    assert two.cache_key_view() != cfg.cache_key_view()
    with pytest.raises(ValueError, match="devices is empty"):
        CloudScoreConfig(model=str(tiny), devices=())


def test_one_scorer_called_from_several_threads_scores_each_call_as_asked(tiny, images):
    """A scorer shared by threads (a server handling requests): each call keeps its own test-time
    augmentation; calls take turns rather than see each other's settings."""
    from concurrent.futures import ThreadPoolExecutor

    scorer, _ = _tta_scorers(tiny, "dihedral")
    alone = {t: scorer.score(images[:3], tta=t)["p_defect"] for t in ("none", "dihedral")}
    assert np.abs(alone["none"] - alone["dihedral"]).max() > 1e-4  # the two calls differ
    with ThreadPoolExecutor(4) as pool:
        calls = [(t, pool.submit(scorer.score, images[:3], tta=t)) for _ in range(3) for t in ("none", "dihedral")]
        for tta, call in calls:
            np.testing.assert_allclose(call.result()["p_defect"], alone[tta], atol=1e-6)
