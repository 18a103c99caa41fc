"""Contract tests against the real (weightless) Qwen2.5-VL-7B and LLaVA-1.5 folders under SAEC_MODELS_DIR.

They check what real weights would see: the scoring prompt, label-token ids, visual-token counts,
and that the parameter names the project trains and saves exist in the real checkpoints. Models
of the real architecture with reduced depth and width (real vocabulary, real processor, random
weights) then train and score end to end on the CPU through the project's own code.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from conftest import MODELS, MODELS_SKIP  # noqa: E402
from saec.artifacts.hashing import sha256_file  # noqa: E402
from saec.prompts import ANSWER_PREFIX, INSTRUCTION, chat_messages  # noqa: E402
from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig  # noqa: E402
from saec.tasks.cloud.engine import VLMScorer, build_prompt_spec  # noqa: E402
from saec.tasks.cloud.models import (  # noqa: E402
    QUANT_SKIP_MODULES,
    VISION_MERGER,
    ModelLoadError,
    load_vlm,
    lora_target_regex,
    to_checkpoint_name,
    weight_files,
)
from saec.tasks.cloud.train import train_vlm  # noqa: E402

QWEN = MODELS / "Qwen2.5-VL-7B-Instruct"
LLAVA = MODELS / "llava-1.5-7b-hf"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not (QWEN / "config.json").is_file() or not (LLAVA / "config.json").is_file(),
                       reason=MODELS_SKIP),
]

PROCESSOR_FILES = {
    "qwen2_5_vl": ["vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json",
                   "preprocessor_config.json", "generation_config.json"],
    "llava": ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "processor_config.json", "generation_config.json"],
}


@pytest.fixture(scope="module", autouse=True)
def _threads(two_torch_threads):  # every test of this module runs with two torch threads
    yield


def index_names(folder: Path) -> set[str]:
    return set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])


def qwen_small_config():
    """The real Qwen2.5-VL config with 1 language layer and 2 vision blocks, narrower, real head sizes and vocab."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(QWEN)
    text = cfg.get_text_config()
    text.num_hidden_layers, text.max_window_layers = 1, 1
    text.hidden_size, text.intermediate_size = 256, 512  # head_dim stays 128 (M-RoPE sections 16/24/24)
    text.num_attention_heads, text.num_key_value_heads = 2, 1
    if hasattr(text, "layer_types") and text.layer_types is not None:
        text.layer_types = text.layer_types[:1]
    vis = cfg.vision_config
    vis.depth, vis.fullatt_block_indexes = 2, [1]
    vis.hidden_size, vis.num_heads, vis.intermediate_size, vis.out_hidden_size = 160, 2, 320, 256  # head_dim 80
    return cfg


def llava_small_config():
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(LLAVA)
    text = cfg.text_config
    text.num_hidden_layers, text.hidden_size, text.intermediate_size = 1, 256, 512
    text.num_attention_heads, text.num_key_value_heads = 2, 2
    vis = cfg.vision_config
    vis.num_hidden_layers, vis.hidden_size, vis.intermediate_size, vis.num_attention_heads = 2, 64, 128, 2
    return cfg


def write_model(folder: Path, cfg, family: str, source: Path) -> Path:
    """A complete model folder: random weights of `cfg` plus the real processor files."""
    from saec.tasks.cloud.models import model_class

    torch.manual_seed(0)
    model = model_class(family)(cfg).to(torch.float32)
    model.save_pretrained(folder)
    for name in PROCESSOR_FILES[family]:
        if (source / name).exists():
            shutil.copy2(source / name, folder / name)
    return folder


def image_files(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (80 + 10 * i, 96, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- Qwen2.5-VL


@pytest.fixture(scope="module")
def qwen_processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(QWEN)


def test_qwen_prompt_and_label_tokens(qwen_processor):
    spec = build_prompt_spec(qwen_processor)
    generation = qwen_processor.apply_chat_template(chat_messages("image")[:1], tokenize=False,
                                                    add_generation_prompt=True)
    assert spec.prefix == generation + ANSWER_PREFIX and spec.matches_generation_prompt
    assert spec.prefix == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\nLabel: "
    )
    tok = qwen_processor.tokenizer
    assert tok.convert_ids_to_tokens(list(spec.label_ids)) == ["0", "1"]
    for label, token_id in zip("01", spec.label_ids):
        ids = tok(spec.prefix + label).input_ids
        assert ids[:-1] == tok(spec.prefix).input_ids and ids[-1] == token_id
    assert spec.n_answer_prefix_tokens == 3  # "Label", ":", " "


def test_qwen_explanation_turn_renders_as_the_engine_asks(qwen_processor, tmp_path):
    from saec.tasks.cloud.engine import explain_prompt
    from saec.tasks.cloud.explain import EXPLAIN_INSTRUCTION
    from saec.tasks.cloud.sft_examples import ExplainTurn, SFTRow, build_examples

    prompt = explain_prompt(qwen_processor)
    assert prompt.count("<|image_pad|>") == 1
    assert prompt.endswith(f"assistant\nLabel: 1<|im_end|>\n<|im_start|>user\n{EXPLAIN_INSTRUCTION}<|im_end|>\n"
                           "<|im_start|>assistant\n")
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 48)).save(image)
    row = SFTRow(image_id="x", image=str(image), label=1, messages=chat_messages(str(image), 1),
                 explain={"bboxes": [[4, 8, 20, 40]], "desc": "scratch", "width": 64, "height": 48})
    (ex,) = build_examples([row], qwen_processor)
    text, spans = ExplainTurn(qwen_processor).render(ex, (448, 448), None)
    assert text == prompt + '{"bboxes": [[28, 74, 140, 374]], "desc": "scratch"}<|im_end|>\n'
    tok = qwen_processor.tokenizer
    ids = tok(text).input_ids
    (after_reply, n_reply), (after_label, n_label) = spans
    assert after_reply == 0 and tok.decode(ids[len(ids) - n_reply:]).startswith('{"bboxes"')
    assert tok.decode(ids[len(ids) - after_label - n_label:len(ids) - after_label]) == "Label: 1<|im_end|>\n"


@pytest.mark.parametrize("side,tokens", [(448, 256), (512, 324)])
def test_qwen_visual_token_count(qwen_processor, side, tokens):
    spec = build_prompt_spec(qwen_processor)
    enc = qwen_processor(text=[spec.prefix], images=[Image.new("RGB", (side, side))], return_tensors="pt")
    merge = qwen_processor.image_processor.merge_size
    n_image = int((enc["input_ids"] == qwen_processor.image_token_id).sum())
    assert n_image == int(enc["image_grid_thw"].prod()) // merge**2 == tokens
    assert int(enc["mm_token_type_ids"].sum()) == n_image  # M-RoPE needs to know which tokens are image tokens


def test_qwen_trained_and_saved_names_exist_in_the_checkpoint():
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen_small_config())
    names = index_names(QWEN)
    params = [n for n, _ in model.named_parameters()]
    # the name mapping is right: every parameter of the small model is a real checkpoint tensor
    missing = [n for n in params if to_checkpoint_name(n, "qwen2_5_vl") not in names]
    assert not missing, missing[:5]
    # LoRA targets: the language model's q/k/v/o (+ MLP), real checkpoint tensors, none in the vision tower
    for mlp, per_layer in ((False, 4), (True, 7)):
        pattern = re.compile(lora_target_regex(mlp))
        targets = [n for n, m in model.named_modules() if pattern.fullmatch(n)]
        assert len(targets) == per_layer * model.config.get_text_config().num_hidden_layers
        for t in targets:
            assert to_checkpoint_name(f"{t}.weight", "qwen2_5_vl") in names
            assert not to_checkpoint_name(t, "qwen2_5_vl").startswith("visual.")
    # the vision side has modules of the same leaf names, which LoRA must not take
    assert any(n.endswith("mlp.gate_proj") for n, _ in model.model.visual.named_modules())
    # the merger saved with the adapter is the checkpoint's visual.merger.*
    merger = {to_checkpoint_name(n, "qwen2_5_vl") for n in params if n.startswith(VISION_MERGER["qwen2_5_vl"] + ".")}
    assert merger == {n for n in names if n.startswith("visual.merger.")}
    modules = dict(model.named_modules())
    assert all(m in modules for m in QUANT_SKIP_MODULES["qwen2_5_vl"])


def test_weightless_real_folder_is_refused_by_name():
    with pytest.raises(ModelLoadError, match=r"5 are missing: model-00001-of-00005.safetensors"):
        weight_files(QWEN)


@pytest.fixture(scope="module")
def qwen_small(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("qwen") / "qwen-small", qwen_small_config(), "qwen2_5_vl", QWEN)


def test_qwen_real_config_trains_and_scores(qwen_small, tmp_path):
    imgs = image_files(tmp_path / "img", 4)
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(
        json.dumps({"image_id": sha256_file(p), "image": str(p), "label": i % 2, "category": "c",
                    "defect_type": "d" if i % 2 else "good", "messages": chat_messages(str(p), i % 2)}) + "\n"
        for i, p in enumerate(imgs)
    ))
    cfg = CloudTrainConfig(model=str(qwen_small), trainable="lora+merger", lora_mlp=True, batch_size=2,
                           grad_accum=1, epochs=1, max_steps=2, resize=112, device="cpu", progress=False)
    summary = train_vlm(cfg, sft, None, tmp_path / "work", tmp_path / "out")
    assert summary["steps"] == 2 and summary["quantization"] == "none"
    adapter_cfg = json.loads((Path(summary["adapter_dir"]) / "adapter_config.json").read_text())
    assert adapter_cfg["modules_to_save"] == ["model.visual.merger"]
    loaded = load_vlm(CloudScoreConfig(model=str(qwen_small), adapter=summary["adapter_dir"]).load_config())
    scorer = VLMScorer(CloudScoreConfig(model=str(qwen_small), resize=112, batch_size=2, progress=False), loaded=loaded)
    out = scorer.score(imgs)
    assert np.isfinite(out["p_defect"]).all() and out["batch_index"].tolist() == [0, 0, 1, 1]
    assert scorer.spec.label_ids == build_prompt_spec(loaded.processor).label_ids


# --------------------------------------------------------------------------- LLaVA-1.5


def test_llava_prompt_label_tokens_and_names():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(LLAVA)
    spec = build_prompt_spec(processor)
    assert spec.prefix == f"USER: <image>\n{INSTRUCTION} ASSISTANT: {ANSWER_PREFIX}"
    tok = processor.tokenizer
    assert [t.lstrip("\u2581") for t in tok.convert_ids_to_tokens(list(spec.label_ids))] == ["0", "1"]
    enc = processor(text=[spec.prefix], images=[Image.new("RGB", (448, 448))], return_tensors="pt")
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == 576  # (336 / 14)^2
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_small_config())
    names = index_names(LLAVA)
    missing = [n for n, _ in model.named_parameters() if to_checkpoint_name(n, "llava") not in names]
    assert not missing, missing[:5]
    pattern = re.compile(lora_target_regex(True))
    targets = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    assert len(targets) == 7 and all(to_checkpoint_name(f"{t}.weight", "llava") in names for t in targets)
    assert not any("vision_tower" in t for t in targets)  # CLIP's own q/k/v_proj are left alone


def test_llava_real_config_scores(tmp_path):
    folder = write_model(tmp_path / "llava-small", llava_small_config(), "llava", LLAVA)
    imgs = image_files(tmp_path / "img", 3)
    fast = VLMScorer(CloudScoreConfig(model=str(folder), resize=448, batch_size=2, progress=False))
    ref = VLMScorer(CloudScoreConfig(model=str(folder), resize=448, batch_size=1, impl="reference", progress=False),
                    loaded=fast.loaded)
    assert fast.family == "llava"
    a, b = fast.score(imgs), ref.score(imgs)
    np.testing.assert_allclose(a["p_defect"], b["p_defect"], atol=1e-5)
    assert np.isfinite(a["p_defect"]).all()
