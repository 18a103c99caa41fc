"""The embedded LLaVA-1.5: a complete Hugging Face folder that loads and runs like the real one."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from conftest import MODELS, MODELS_SKIP
from saec.artifacts.hashing import sha256_file
from saec.prompts import INSTRUCTION, answer, chat_messages
from saec.tasks.cloud.tiny_llava import (
    BOS,
    EOS,
    IMAGE,
    PAD,
    RECIPE_FILE,
    UNK,
    WEIGHTS_FILE,
    TinyLlavaConfig,
    build_tiny_llava,
)

REAL = MODELS / "llava-1.5-7b-hf"
needs_real = pytest.mark.skipif(not (REAL / "config.json").is_file(), reason=MODELS_SKIP)

# Files of the published folder the tiny one does not write: the SentencePiece model (the fast
# tokenizer.json is complete without it) and the shard index (one model.safetensors instead).
NOT_WRITTEN = {"tokenizer.model", "model.safetensors.index.json"}
# Keys that record where the publisher's files came from, not what the model is.
PROVENANCE_KEYS = {"transformers_version", "_name_or_path", "sp_model_kwargs"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "llava-tiny")


@pytest.fixture(scope="module")
def processor(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def model(folder):
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return LlavaForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def real_processor():
    if not (REAL / "config.json").is_file():
        pytest.skip(f"real LLaVA folder {REAL} is absent")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(REAL)


def _image(seed: int, size=(150, 110)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _missing_keys(real: dict, ours: dict, where: str = "") -> list[str]:
    missing = []
    for key, value in real.items():
        if key in PROVENANCE_KEYS:
            continue
        if key not in ours:
            missing.append(where + key)
        elif isinstance(value, dict) and isinstance(ours[key], dict) and key != "added_tokens_decoder":
            missing += _missing_keys(value, ours[key], f"{where}{key}.")
    return missing


# --------------------------------------------------------------------------- config


def test_config_rejects_bad_values_before_work():
    with pytest.raises(ValidationError, match="multiple of patch_size"):
        TinyLlavaConfig(image_size=100)
    with pytest.raises(ValidationError, match="vision_feature_layer"):
        TinyLlavaConfig(vision_feature_layer=-4)
    with pytest.raises(ValidationError, match="divisible by num_key_value_heads"):
        TinyLlavaConfig(num_key_value_heads=3)
    with pytest.raises(ValidationError, match="vocab_target"):
        TinyLlavaConfig(vocab_target=300)
    with pytest.raises(ValidationError, match="extra"):
        TinyLlavaConfig(hidden=64)


# --------------------------------------------------------------------------- layout versus the real folder


@needs_real
def test_layout_and_config_keys_match_the_real_folder(folder):
    real_files = {p.name for p in REAL.iterdir() if p.is_file()}
    ours = {p.name for p in folder.iterdir()}
    assert real_files - NOT_WRITTEN <= ours
    assert ours - real_files == {WEIGHTS_FILE, RECIPE_FILE}
    for name in (
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "added_tokens.json",
    ):
        assert _missing_keys(_json(REAL / name), _json(folder / name)) == [], name

    real_cfg, cfg = _json(REAL / "config.json"), _json(folder / "config.json")
    for key in ("architectures", "model_type", "projector_hidden_act", "vision_feature_layer",
                "vision_feature_select_strategy", "tie_word_embeddings", "ignore_index"):
        assert cfg[key] == real_cfg[key], key
    assert cfg["vision_config"]["model_type"] == real_cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert cfg["text_config"]["model_type"] == real_cfg["text_config"]["model_type"] == "llama"
    assert cfg["vocab_size"] % 64 == 0 == real_cfg["vocab_size"] % 64
    # the same special-token layout: <image> and <pad> right after the base vocabulary
    real_added, added = _json(REAL / "added_tokens.json"), _json(folder / "added_tokens.json")
    assert real_added["<image>"] == real_cfg["image_token_index"] and real_added["<pad>"] == real_cfg["pad_token_id"]
    assert added["<image>"] == cfg["image_token_index"]
    assert added["<pad>"] == cfg["pad_token_id"] == added["<image>"] + 1
    for name in ("processor_config.json", "special_tokens_map.json"):
        real, ours_cfg = _json(REAL / name), _json(folder / name)
        assert {k: v for k, v in ours_cfg.items() if k != "patch_size"} == {
            k: v for k, v in real.items() if k != "patch_size"
        }, name
    assert _json(folder / "chat_template.json")["chat_template"] == (folder / "chat_template.jinja").read_text()


@needs_real
def test_weights_use_the_published_parameter_names(folder):
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        ours = set(f.keys())
    real = set(_json(REAL / "model.safetensors.index.json")["weight_map"])

    def layerless(names):
        return {re.sub(r"layers\.\d+\.", "layers.N.", n) for n in names}

    assert layerless(ours) == layerless(real)


@needs_real
def test_chat_template_renders_exactly_like_the_real_one(processor, real_processor):
    for messages, generation in (
        (chat_messages("img.png"), True),
        (chat_messages("img.png", 0), False),
        (chat_messages("img.png", 1), False),
        ([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *chat_messages("img.png", 1)], False),
    ):
        ours = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        real = real_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert ours == real
    assert ours.startswith("Be brief. USER: <image>\n" + INSTRUCTION + " ASSISTANT: Label: 1")


@needs_real
def test_tokenizer_segments_prompts_like_the_real_one(processor, real_processor):
    """Special tokens, byte fallback, the space mark and the answer's tokens as the LLaMA tokenizer has them."""
    tok, real = processor.tokenizer, real_processor.tokenizer
    for text in (answer(0), answer(1), "USER: <image>\n" + INSTRUCTION, "<image>\n\t{}"):
        ours_tokens = tok.convert_ids_to_tokens(tok(text).input_ids)
        real_tokens = real.convert_ids_to_tokens(real(text).input_ids)
        if text.startswith("Label"):
            assert ours_tokens == real_tokens == ["<s>", "\u2581Label", ":", "\u2581", text[-1]]
        else:
            # the same special tokens and the same byte-fallback tokens (newline, tab) in the same
            # places; the pieces between them differ with the vocabulary
            byte_or_special = re.compile(r"^<(0x[0-9A-F]{2}|s|/s|image|pad|unk)>$")
            assert [t for t in ours_tokens if byte_or_special.match(t)] == [
                t for t in real_tokens if byte_or_special.match(t)
            ]


# --------------------------------------------------------------------------- tokenizer


def test_special_tokens_and_single_label_tokens(folder, processor):
    from transformers import LlamaTokenizer

    cfg = _json(folder / "config.json")
    tok = processor.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in (UNK, BOS, EOS)] == [0, 1, 2]
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (UNK, BOS, EOS, PAD)
    assert tok.convert_tokens_to_ids(IMAGE) == cfg["image_token_index"] == processor.image_token_id
    assert tok.pad_token_id == cfg["pad_token_id"] == cfg["image_token_index"] + 1
    assert len(tok) == cfg["image_token_index"] + 2 <= cfg["vocab_size"]
    assert tok.padding_side == "left"

    # "0" and "1" are single tokens after "Label: ", appended to the prefix's own tokens, with
    # the tokenizer class AutoTokenizer picks and with the LLaMA class (which rebuilds its pipeline)
    prefix = processor.apply_chat_template(chat_messages("x"), tokenize=False, add_generation_prompt=True) + " Label: "
    for t in (tok, LlamaTokenizer.from_pretrained(folder)):
        ids_prefix = t(prefix).input_ids
        labels = []
        for label in ("0", "1"):
            ids = t(prefix + label).input_ids
            assert ids[:-1] == ids_prefix and len(ids) == len(ids_prefix) + 1
            labels.append(ids[-1])
        assert labels == [t.convert_tokens_to_ids("0"), t.convert_tokens_to_ids("1")]
        assert labels[0] != labels[1]
    # any text encodes (byte fallback) and decodes back
    text = "Kratzer \u00fcber 3 mm \u2713 {\"bboxes\": []}"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert UNK not in tok.convert_ids_to_tokens(tok(text).input_ids)


# --------------------------------------------------------------------------- processor and forward


def test_processor_expands_image_token_to_the_patch_count_and_forward_runs(folder, processor, model):
    import torch

    recipe = TinyLlavaConfig()
    cfg = model.config
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    assert patches == recipe.patches_per_image == _json(folder / RECIPE_FILE)["visual_tokens_per_image"]

    prompt = processor.apply_chat_template(chat_messages("x"), tokenize=False, add_generation_prompt=True)
    images = [_image(0, (150, 110)), _image(1, (64, 200))]
    enc = processor(text=[prompt, prompt + " Label:"], images=images, return_tensors="pt", padding=True)
    assert tuple(enc["pixel_values"].shape) == (2, 3, recipe.image_size, recipe.image_size)
    n_image = (enc["input_ids"] == cfg.image_token_index).sum(dim=1)
    assert n_image.tolist() == [patches, patches]
    # left padding: the shorter prompt is padded at its start with <pad>
    assert enc["input_ids"][0, 0].item() == processor.tokenizer.pad_token_id and enc["attention_mask"][0, 0] == 0

    with torch.inference_mode():
        features = model.get_image_features(pixel_values=enc["pixel_values"])
        out = model(**enc)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    hidden = cfg.text_config.hidden_size
    flat = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.reshape(-1, hidden)
    assert flat.shape == (2 * patches, hidden)
    assert out.logits.shape == (2, enc["input_ids"].shape[1], cfg.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # the image changes the prediction: the vision tower is wired in
    swapped = dict(enc, pixel_values=enc["pixel_values"].flip(0))
    with torch.inference_mode():
        out_swapped = model(**swapped)
    assert not torch.allclose(out.logits[:, -1], out_swapped.logits[:, -1])


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_files_other_seed_other_weights(folder, tmp_path):
    again = build_tiny_llava(tmp_path / "again")
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert sha256_file(folder / name) == sha256_file(again / name), name

    other = build_tiny_llava(tmp_path / "other", TinyLlavaConfig(seed=1))
    assert sha256_file(other / WEIGHTS_FILE) != sha256_file(folder / WEIGHTS_FILE)
    assert sha256_file(other / "tokenizer.json") == sha256_file(folder / "tokenizer.json")
    # rebuilding into an existing folder replaces it whole
    (other / "stale.txt").write_text("x")
    build_tiny_llava(other, TinyLlavaConfig(seed=1))
    assert not (other / "stale.txt").exists()


# --------------------------------------------------------------------------- through the scoring engine


def _scorer_supports_llava() -> bool:
    try:
        from saec.tasks.cloud.models import SUPPORTED_FAMILIES
    except ImportError:
        return False
    return "llava" in SUPPORTED_FAMILIES


@pytest.mark.skipif(
    not _scorer_supports_llava(), reason="saec.tasks.cloud.engine.VLMScorer does not load llava models yet"
)
def test_vlm_scorer_scores_the_tiny_llava(folder, processor, model, tmp_path):
    import torch

    from saec.tasks.cloud.config import CloudScoreConfig
    from saec.tasks.cloud.engine import PromptError, VLMScorer, build_prompt_spec
    from saec.tasks.cloud.images import load_rgb

    try:
        build_prompt_spec(processor)
    except PromptError as exc:
        # The tiny folder renders and tokenizes the prompt as LLaVA-1.5 does (tested above), so a
        # rejection is the engine's missing LLaVA support; where the real folder is at hand, the
        # engine must reject it for the same reason, or the tiny folder is at fault.
        if (REAL / "config.json").is_file():
            from transformers import AutoProcessor

            with pytest.raises(PromptError) as real_exc:
                build_prompt_spec(AutoProcessor.from_pretrained(REAL))
            assert str(real_exc.value) == str(exc)
        pytest.skip(f"VLMScorer cannot score LLaVA-1.5 prompts yet: build_prompt_spec rejects them ({exc})")

    paths = []
    for i, size in enumerate([(150, 110), (64, 200), (90, 90)]):
        paths.append(tmp_path / f"{i}.png")
        _image(10 + i, size).save(paths[-1])

    common = dict(model=str(folder), family="llava", resize=112, batch_size=2, device="cpu", dtype="float32",
                  decode_workers=1, prefetch_batches=1, progress=False)
    fast = VLMScorer(CloudScoreConfig(**common, impl="fast"))
    assert fast.family == "llava"
    tok = processor.tokenizer
    assert fast.spec.label_ids == (tok.convert_tokens_to_ids("0"), tok.convert_tokens_to_ids("1"))
    scores = fast.score(paths)
    reference = VLMScorer(CloudScoreConfig(**common, impl="reference")).score(paths)

    assert scores["p_defect"].shape == (3,)
    assert np.all((scores["p_defect"] > 0) & (scores["p_defect"] < 1))
    np.testing.assert_allclose(scores["logit_0"], reference["logit_0"], atol=1e-4)
    np.testing.assert_allclose(scores["logit_1"], reference["logit_1"], atol=1e-4)
    sigmoid = 1 / (1 + np.exp(-(scores["logit_1"].astype(np.float64) - scores["logit_0"])))
    np.testing.assert_allclose(scores["p_defect"], sigmoid, rtol=1e-6)

    # the engine's logits equal a plain forward of its prompt, image by image
    for i, path in enumerate(paths):
        enc = processor(text=[fast.spec.prefix], images=[load_rgb(str(path), 112)], return_tensors="pt")
        with torch.inference_mode():
            logits = model(**enc).logits[0, -1, list(fast.spec.label_ids)]
        np.testing.assert_allclose([scores["logit_0"][i], scores["logit_1"][i]], logits.numpy(), atol=1e-4)
