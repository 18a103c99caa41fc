"""Cloud-model training on the embedded tiny Qwen2.5-VL: answer-only loss, adapters, QLoRA, resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from saec.artifacts.hashing import sha256_file  # noqa: E402
from saec.artifacts.store import read_table  # noqa: E402
from saec.prompts import chat_messages  # noqa: E402
from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig, ModelLoadConfig, TinyModelConfig  # noqa: E402
from saec.tasks.cloud.engine import VLMScorer  # noqa: E402
from saec.tasks.cloud.models import ModelLoadError, load_vlm  # noqa: E402
from saec.tasks.cloud.tiny import build_tiny_qwen  # noqa: E402
from saec.tasks.cloud.augment import Augmentation  # noqa: E402
from saec.tasks.cloud.checkpoints import ResumeError, WeightAverage  # noqa: E402
from saec.tasks.cloud.sft_examples import (  # noqa: E402
    Example,
    SFTDataError,
    answer_loss,
    build_examples,
    prepare_batch,
    read_sft,
)
from saec.tasks.cloud.train import train_vlm  # noqa: E402
from saec.tasks.cloud.trainable import setup_trainable  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _threads(two_torch_threads):  # every test of this module runs with two torch threads
    yield


def write_sft(folder: Path, n: int, seed: int = 0, explain: bool = False) -> Path:
    """An SFT JSONL in the pipeline's format: defects carry a bright square on a noisy background.

    With `explain`, each defect's record also holds its explanation target (the square's box).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = folder / "sft.jsonl"
    with open(path, "w") as fh:
        for i in range(n):
            label = i % 2
            arr = rng.integers(60, 120, (96, 96, 3)).astype(np.uint8)
            if label:
                x, y = rng.integers(0, 64, 2)
                arr[y : y + 28, x : x + 28] = 255
            img = folder / f"{i:03d}.png"
            Image.fromarray(arr).save(img)
            record = {"image_id": sha256_file(img), "image": str(img), "label": label, "category": "squares",
                      "defect_type": "square" if label else "good", "messages": chat_messages(str(img), label)}
            if explain and label:
                record["explain"] = {"bboxes": [[int(x), int(y), int(x) + 28, int(y) + 28]], "desc": "square",
                                     "width": 96, "height": 96}
            fh.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    return write_sft(tmp_path_factory.mktemp("sft"), 12)


def tiny_cfg(model: Path, **kw) -> CloudTrainConfig:
    """The embedded recipe at test size, on a tiny model with random weights (so its output layer trains too)."""
    base = dict(epochs=1, batch_size=4, resize=56, progress=False, checkpoint_every=2, augment="none",
                augment_lighting=0.0, train_output_layer=True)
    return CloudTrainConfig.tiny(model, **{**base, **kw})


# --------------------------------------------------------------------------- data and loss


def test_sft_rows_are_validated(tmp_path, sft):
    lines = sft.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["messages"][-1]["content"][0]["text"] = "Label: 0"  # contradicts label 1
    (tmp_path / "a.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SFTDataError, match=r"a.jsonl:2: label 1 but the assistant says 'Label: 0'"):
        read_sft(tmp_path / "a.jsonl")
    gone = json.loads(lines[0]) | {"image": str(tmp_path / "gone.png")}
    (tmp_path / "b.jsonl").write_text(json.dumps(gone) + "\n")
    with pytest.raises(SFTDataError, match="gone.png does not exist"):
        read_sft(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text(json.dumps(json.loads(lines[0]) | {"label": 2}) + "\n")
    with pytest.raises(SFTDataError, match="label"):
        read_sft(tmp_path / "c.jsonl")


def test_loss_is_on_the_answer_tokens_only(tiny, sft):
    loaded = load_vlm(ModelLoadConfig(model=str(tiny)))
    processor = loaded.processor
    processor.tokenizer.padding_side = "right"
    examples = build_examples(read_sft(sft)[:3], processor)
    batch = prepare_batch(processor, loaded.family, examples, 56)
    tok = processor.tokenizer
    for row, ex in zip(range(3), examples):
        answer = tok.decode(batch["input_ids"][row][batch["answer_mask"][row]])
        assert answer == f"Label: {ex.label}<|im_end|>\n"
    # the same loss as the plain Hugging Face forward with the prompt masked to -100
    labels = torch.where(batch["answer_mask"], batch["input_ids"], torch.full_like(batch["input_ids"], -100))
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        plain = loaded.model(**{k: batch[k] for k in keys}, labels=labels).loss
        ours, n_tokens = answer_loss(loaded.model, batch)
    assert n_tokens == int(batch["answer_mask"][:, 1:].sum()) == 3 * 6
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_lora_targets_the_language_model_only(tiny, sft):
    loaded = load_vlm(ModelLoadConfig(model=str(tiny)))
    model = setup_trainable(loaded, CloudTrainConfig(model=str(tiny), trainable="lora+merger", quantization="none"))
    # the frozen vision blocks stay out of the autograd graph; the trainable merger is in it
    seen = {}
    visual = model.get_base_model().model.visual

    def spy(name):
        def hook(module, args, output):
            seen[name] = output.requires_grad

        return hook

    visual.blocks[-1].register_forward_hook(spy("blocks"))
    visual.merger.register_forward_hook(spy("merger"))
    loaded.processor.tokenizer.padding_side = "right"
    batch = prepare_batch(loaded.processor, loaded.family, build_examples(read_sft(sft)[:2], loaded.processor), 56)
    model.train()
    loss, _ = answer_loss(model.get_base_model(), batch)
    loss.backward()
    assert seen == {"blocks": False, "merger": True}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".language_model.layers." in n for n in lora)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    saved = [n for n in trainable if "lora_" not in n]
    assert saved and all(".visual.merger.modules_to_save." in n for n in saved)
    assert not any(".visual.blocks." in n for n in trainable)


def test_augmentation_is_reproducible_and_limited_to_its_categories(tiny, sft, tmp_path):
    from saec.tasks.cloud.augment import augment_ops

    loaded = load_vlm(ModelLoadConfig(model=str(tiny)))
    loaded.processor.tokenizer.padding_side = "right"
    rows = read_sft(sft)
    rows = [r.model_copy(update={"category": "mesh" if i % 3 else "capsule"}) for i, r in enumerate(rows)]
    examples = build_examples(rows, loaded.processor)
    cfg = tiny_cfg(tiny, augment="dihedral", augment_categories=("mesh",))
    by_epoch = [augment_ops(cfg, epoch, examples) for epoch in range(4)]
    assert by_epoch[1] == augment_ops(cfg, 1, examples)  # fixed by (seed, epoch): a resume sees the same images
    assert by_epoch[0] != by_epoch[1]
    for ops in by_epoch:
        assert all(op is None for op, ex in zip(ops, examples) if ex.category == "capsule")
    mesh_ops = {op for ops in by_epoch for op, ex in zip(ops, examples) if ex.category == "mesh"}
    assert len(mesh_ops) >= 5  # 32 draws from the eight flips and turns
    flips = {op for e in range(4) for op in augment_ops(tiny_cfg(tiny, augment="flip", augment_categories=None), e, examples)}
    assert flips == {None, Image.Transpose.FLIP_LEFT_RIGHT}
    assert set(augment_ops(tiny_cfg(tiny, augment="none"), 0, examples)) == {None}

    # the model sees the transformed image: the batch equals one built from the turned file
    ex = next(e for e, op in zip(examples, by_epoch[0]) if op is not None)
    op = by_epoch[0][examples.index(ex)]
    turned = tmp_path / "turned.png"
    Image.open(ex.image).convert("RGB").resize((56, 56), Image.Resampling.BICUBIC).transpose(op).save(turned)
    got = prepare_batch(loaded.processor, loaded.family, [ex], 56, [Augmentation(transpose=op)])
    want = prepare_batch(loaded.processor, loaded.family, [Example(str(turned), ex.label, ex.text,
                                                                   ex.n_answer_tokens)], 56)
    plain = prepare_batch(loaded.processor, loaded.family, [ex], 56)
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"])
    assert not torch.allclose(got["pixel_values"], plain["pixel_values"])


def test_explanation_boxes_follow_resize_turns_and_shifts():
    from saec.tasks.cloud.explain import ExplainTarget, map_boxes
    from saec.tasks.cloud.augment import shift_image

    mask = np.zeros((60, 90), np.uint8)  # not square, so turns swap the sides; edges even, so halving is exact
    mask[12:30, 10:28] = 255
    mask[44:56, 60:86] = 255
    target = ExplainTarget(bboxes=[[10, 12, 28, 30], [60, 44, 86, 56]], desc="two spots", width=90, height=60)

    for op in [None, *Image.Transpose]:
        img = Image.fromarray(mask).resize((45, 30), Image.Resampling.NEAREST)
        img = img if op is None else img.transpose(op)
        for shift in (None, (3, -2)):
            shown = img if shift is None else shift_image(img, *shift)
            got = map_boxes(target, (45, 30), op, shift)
            # each box holds exactly one region of the mask as the model sees it (mirrored border aside)
            a = np.asarray(shown) > 127
            covered = np.zeros_like(a)
            for x0, y0, x1, y1 in got:
                region = a[y0:y1, x0:x1]
                assert region.any() and region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
                covered[y0:y1, x0:x1] = True
            h, w = a.shape
            if shift is None:
                assert not (a & ~covered).any()  # nothing of the mask outside the boxes
            else:
                inner = a[3 : h - 3, 3 : w - 3] & ~covered[3 : h - 3, 3 : w - 3]
                assert not inner.any()
    assert map_boxes(target, None) == [[10, 12, 28, 30], [60, 44, 86, 56]]
    assert map_boxes(target, (45, 30), None, (-10, 0)) == [[0, 6, 4, 15], [20, 22, 33, 28]]
    assert map_boxes(target, (45, 30), None, (0, -20)) == [[30, 2, 43, 8]]  # the first box left the image


def test_explanation_turn_trains_on_both_answers(tiny, tmp_path):
    from saec.tasks.cloud.engine import explain_prompt
    from saec.tasks.cloud.explain import map_boxes
    from saec.tasks.cloud.sft_examples import ExplainTurn

    path = write_sft(tmp_path / "sft", 4, seed=3, explain=True)
    loaded = load_vlm(ModelLoadConfig(model=str(tiny)))
    processor = loaded.processor
    examples = build_examples(read_sft(path), processor)
    assert [ex.explain is not None for ex in examples] == [False, True, False, True]
    augs = [None, Augmentation(transpose=Image.Transpose.ROTATE_90), None, None]
    turn = ExplainTurn(processor)
    tok = processor.tokenizer
    decoded = {}
    for side in ("right", "left"):
        processor.tokenizer.padding_side = side
        batch = prepare_batch(processor, loaded.family, examples, 56, augs, turn)
        decoded[side] = [tok.decode(batch["input_ids"][i][batch["answer_mask"][i]]) for i in range(4)]
    assert decoded["left"] == decoded["right"]
    for i, ex in enumerate(examples):
        if ex.explain is None:
            assert decoded["right"][i] == "Label: 0<|im_end|>\n"
            continue
        boxes = map_boxes(ex.explain, (56, 56), augs[i].transpose if augs[i] else None)
        assert decoded["right"][i] == f'Label: 1<|im_end|>\n{{"bboxes": {boxes}, "desc": "square"}}<|im_end|>\n'
        # the box is where the bright square is in the image the model is shown
        shown = Image.open(ex.image).convert("L").resize((56, 56), Image.Resampling.BICUBIC)
        shown = shown if augs[i] is None else augs[i].apply(shown)
        ys, xs = np.nonzero(np.asarray(shown) > 200)
        (x0, y0, x1, y1), = boxes
        assert abs(xs.min() - x0) <= 1 and abs(ys.min() - y0) <= 1 and abs(xs.max() + 1 - x1) <= 1 and abs(ys.max() + 1 - y1) <= 1
        # the follow-up turn reads as the scoring engine's explanation prompt
        text, _ = turn.render(ex, (56, 56), augs[i])
        assert text.startswith(explain_prompt(processor))
    # training with the turn runs, and says how many examples it explained
    cfg = tiny_cfg(tiny, explain_turn=True, max_steps=1)
    summary = train_vlm(cfg, path, None, tmp_path / "work", tmp_path / "out")
    assert summary["explained_examples"] == 2 and np.isfinite(summary["final_loss"])


def test_shift_and_lighting_move_and_relight_pixels():
    from saec.tasks.cloud.augment import relight_image, shift_image

    arr = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    moved = np.asarray(shift_image(im, 3, -2))  # 3 px right, 2 px up
    assert moved.shape == arr.shape
    np.testing.assert_array_equal(moved[:-2, 3:], arr[2:, :-3])
    np.testing.assert_array_equal(moved[:-2, 2], arr[2:, 1])  # the uncovered left columns mirror the image
    np.testing.assert_array_equal(moved[-2:, 3:], arr[[-2, -3], :-3])  # ... and so do the bottom rows
    assert shift_image(im, 0, 0) is im
    with pytest.raises(ValueError, match="larger than 20 px"):
        shift_image(im, 20, 0)

    assert np.array_equal(np.asarray(relight_image(im, 1.0, 1.0)), arr)
    flat = np.asarray(relight_image(im, 1.0, 0.5), dtype=np.float64)
    assert abs(flat.mean() - arr.mean()) < 1 and abs(flat.std() / arr.std() - 0.5) < 0.02
    brighter = np.asarray(relight_image(Image.fromarray(arr // 2), 1.3, 1.0), dtype=np.float64)
    assert abs(brighter.mean() / (arr // 2).mean() - 1.3) < 0.01
    grey = relight_image(im.convert("L"), 0.8, 1.2)
    assert grey.mode == "L" and grey.size == im.size


def test_augmentation_plan_draws_each_kind_from_its_own_stream(tiny, sft, tmp_path):
    from saec.tasks.cloud.augment import augment_plan

    loaded = load_vlm(ModelLoadConfig(model=str(tiny)))
    rows = read_sft(sft)
    rows = [r.model_copy(update={"category": "mesh" if i % 3 else "capsule"}) for i, r in enumerate(rows)]
    examples = build_examples(rows, loaded.processor)
    assert augment_plan(tiny_cfg(tiny, augment="none"), 0, examples) == [None] * len(examples)
    turns = tiny_cfg(tiny, augment="dihedral", augment_categories=("mesh",))
    full = tiny_cfg(tiny, augment="dihedral", augment_categories=("mesh",), augment_shift=4, augment_lighting=0.2)
    plan = augment_plan(full, 1, examples)
    assert plan == augment_plan(full, 1, examples) and plan != augment_plan(full, 2, examples)
    assert all(aug is None for aug, ex in zip(plan, examples) if ex.category == "capsule")
    mesh = [aug for aug, ex in zip(plan, examples) if ex.category == "mesh"]
    assert all(aug is not None and aug.shift is not None and aug.lighting is not None for aug in mesh)
    assert all(max(map(abs, aug.shift)) <= 4 and all(0.8 <= f <= 1.2 for f in aug.lighting) for aug in mesh)
    assert len({aug.shift for aug in mesh}) > 3
    # adding shifts and lighting leaves the turns as they were (a recipe change does not reshuffle them)
    assert [a.transpose if a else None for a in plan] == [a.transpose if a else None for a in augment_plan(turns, 1, examples)]

    # the model sees the augmented image: the batch equals one built from the augmented file
    ex, aug = next((e, a) for e, a in zip(examples, plan) if a is not None)
    done = tmp_path / "augmented.png"
    aug.apply(Image.open(ex.image).convert("RGB").resize((56, 56), Image.Resampling.BICUBIC)).save(done)
    got = prepare_batch(loaded.processor, loaded.family, [ex], 56, [aug])
    want = prepare_batch(loaded.processor, loaded.family, [Example(str(done), ex.label, ex.text, ex.n_answer_tokens)], 56)
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"])


def test_augmenting_a_category_the_data_lacks_warns(tiny, sft, tmp_path):
    cfg = tiny_cfg(tiny, max_steps=1, augment="dihedral", augment_categories=("grids",))
    with pytest.warns(UserWarning, match=r"none of augment_categories \['grids'\] occurs.*\['squares'\]"):
        summary = train_vlm(cfg, sft, None, tmp_path / "work", tmp_path / "out")
    assert summary["augmented_examples"] == 0


def test_train_config_validates():
    with pytest.raises(ValueError, match="4-bit"):
        CloudTrainConfig(model="m", trainable="full", quantization="nf4")
    with pytest.raises(ValueError):
        CloudTrainConfig(model="m", lr=0)
    cfg = CloudTrainConfig(model="m")
    assert (cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.warmup_ratio) == (3, 2, 8, 2e-4, 0.03)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.trainable) == (8, 16, 0.05, "lora+merger")


# --------------------------------------------------------------------------- training end to end


# PEFT's loader reads a property that transformers 5 has renamed; the warning says nothing about SAEC.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_train_adapter_loads_and_scores(tiny, sft, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    summary = train_vlm(tiny_cfg(tiny, epochs=2), sft, sft, tmp_path / "work", tmp_path / "out")
    adapter = Path(summary["adapter_dir"])
    assert summary["steps"] == summary["total_steps"] == 6 and summary["resumed_from_step"] is None
    assert (adapter / "adapter_config.json").is_file() and (adapter / "saec_adapter.json").is_file()
    assert summary["val"]["n"] == 12
    log = read_table(tmp_path / "out" / "train_log.parquet")
    assert log.step.tolist() == list(range(1, 7)) and (log.session == 0).all()
    assert log.loss.iloc[-1] < log.loss.iloc[0] and (log.images_per_s > 0).all()
    # the adapter is a plain PEFT adapter
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny)
    peft_model = PeftModel.from_pretrained(base, adapter)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    # and scoring with it (merged, fast) equals the unmerged reference path, and differs from the base
    images = [json.loads(line)["image"] for line in sft.read_text().splitlines()]
    cfg = dict(model=str(tiny), resize=56, batch_size=5, progress=False)
    fast = VLMScorer(CloudScoreConfig(**cfg, adapter=str(adapter)))
    ref = VLMScorer(CloudScoreConfig(**cfg, adapter=str(adapter), impl="reference"))
    bare = VLMScorer(CloudScoreConfig(**cfg))
    assert fast.merged and not ref.merged
    a, b, c = fast.score(images), ref.score(images), bare.score(images)
    np.testing.assert_allclose(a["p_defect"], b["p_defect"], atol=1e-4)
    assert np.abs(a["p_defect"] - c["p_defect"]).max() > 1e-3
    assert fast.adapter_id == summary["adapter_id"]


def test_adapter_refuses_another_base(tiny, sft, tmp_path):
    summary = train_vlm(tiny_cfg(tiny, max_steps=1), sft, None, tmp_path / "work", tmp_path / "out")
    other = build_tiny_qwen(tmp_path / "other", TinyModelConfig(seed=5))
    with pytest.raises(ModelLoadError, match="trained on base model"):
        load_vlm(ModelLoadConfig(model=str(other), adapter=summary["adapter_dir"]))


def test_resume_refuses_a_changed_config(tiny, sft, tmp_path):
    train_vlm(tiny_cfg(tiny, max_steps=2), sft, None, tmp_path / "work", tmp_path / "out")
    with pytest.raises(ResumeError, match="config"):
        train_vlm(tiny_cfg(tiny, max_steps=2, lr=1e-4), sft, None, tmp_path / "work", tmp_path / "out")


class _Marker:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_reads_no_pickle(tiny, sft, tmp_path):
    import pickle

    from safetensors.torch import load_file

    cfg = tiny_cfg(tiny, max_steps=2, checkpoint_every=1, lora_dropout=0.1)
    work, marker = tmp_path / "work", tmp_path / "unpickled"
    train_vlm(cfg, sft, None, work, tmp_path / "out")
    step1, step2 = work / "checkpoints" / "step-00000001", work / "checkpoints" / "step-00000002"
    assert {"rng.json", "rng.safetensors"} <= {p.name for p in step1.iterdir()}
    assert not list(step1.glob("rng.pt"))
    shutil.rmtree(step2)
    # a stray rng.pt is never read: resuming uses rng.json and rng.safetensors, and is exact
    (step1 / "rng.pt").write_bytes(pickle.dumps(_Marker(marker)))
    summary = train_vlm(cfg, sft, None, work, tmp_path / "out2")
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2 and not marker.exists()
    a = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "out2" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # a checkpoint of the older format (rng.pt, no rng.json) is refused without reading rng.pt
    shutil.rmtree(step2)
    rng_json = (step1 / "rng.json").read_text()
    (step1 / "rng.json").unlink()
    with pytest.raises(ResumeError, match=r"rng\.pt.*delete .*checkpoints to start over"):
        train_vlm(cfg, sft, None, work, tmp_path / "out3")
    assert not marker.exists()
    # a crafted optimizer.pt fails to load (weights_only) instead of running
    (step1 / "rng.json").write_text(rng_json)
    (step1 / "optimizer.pt").write_bytes(pickle.dumps(_Marker(marker), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        train_vlm(cfg, sft, None, work, tmp_path / "out4")
    assert not marker.exists()


def test_qlora_nf4_keeps_the_merger_trainable(tiny, sft, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    cfg = CloudTrainConfig(model=str(tiny), quantization="nf4", trainable="lora+merger", dtype="float32",
                           device="cpu", epochs=1, batch_size=4, grad_accum=1, max_steps=2, lr=1e-2,
                           resize=56, progress=False)
    summary = train_vlm(cfg, sft, None, tmp_path / "work", tmp_path / "out")
    assert summary["quantization"] == "nf4" and summary["steps"] == 2
    loaded = load_vlm(ModelLoadConfig(model=str(tiny), quantization="nf4", adapter=summary["adapter_dir"]))
    base = loaded.base
    layers = dict(base.named_modules())
    assert isinstance(layers["model.language_model.layers.0.self_attn.q_proj"].base_layer, bnb.nn.Linear4bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in layers.items() if n.startswith("model.visual"))
    assert not isinstance(layers["lm_head"], bnb.nn.Linear4bit)
    # the merger trained: its saved copy differs from the base weights
    merger = layers["model.visual.merger"]
    trained = merger.modules_to_save["default"].mlp[0].weight
    original = merger.original_module.mlp[0].weight
    assert not torch.allclose(trained.float(), original.float())


@pytest.mark.slow
def test_weight_average_follows_the_trained_weights():
    p = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([("p", p)], decay=0.9)
    expected = torch.zeros(3)
    for step in range(1, 31):
        with torch.no_grad():
            p.add_(torch.tensor([1.0, -2.0, 0.5]))
        average.update(step)
        d = min(0.9, (1 + step) / (10 + step))  # the ramp: early steps weigh more than the decay says
        expected = d * expected + (1 - d) * p.detach()
    torch.testing.assert_close(average.shadow[0], expected)
    assert not torch.allclose(expected, p.detach())
    restored = WeightAverage([("p", torch.nn.Parameter(torch.zeros(3)))], decay=0.9)
    restored.load_state_dict(average.state_dict())
    torch.testing.assert_close(restored.shadow[0], expected)
    with pytest.raises(ResumeError, match="other parameters"):
        restored.load_state_dict({"q": expected})
    average.copy_to_model()
    torch.testing.assert_close(p.detach(), expected)


def test_killed_training_resumes_where_it_stopped(tiny, tmp_path):
    data = write_sft(tmp_path / "data", 24, seed=3)
    cfg = tiny_cfg(tiny, epochs=2, batch_size=2, grad_accum=1, checkpoint_every=1, lora_dropout=0.1,
                   augment="dihedral", augment_categories=None, augment_shift=3, augment_lighting=0.1,
                   ema_decay=0.8)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    args = [sys.executable, "-m", "saec.tasks.cloud.train", "--config", str(tmp_path / "cfg.json"),
            "--train", str(data), "--threads", "1"]
    work, out = tmp_path / "work", tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*args, "--work", str(work), "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = work / "checkpoints" / "step-00000003" / "state.json"
    deadline = time.monotonic() + 240
    while not first.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in (work / "checkpoints").glob("step-*"))
    assert killed_at < 24, "training finished before it could be interrupted"
    (work / "checkpoints" / ".tmp-step-99999999-1").mkdir()  # a checkpoint cut off mid-write is ignored

    summary = train_vlm(cfg, data, None, work, out)
    assert summary["resumed_from_step"] == killed_at and summary["steps"] == 24
    assert not (work / "checkpoints" / ".tmp-step-99999999-1").exists()
    log = read_table(out / "train_log.parquet")
    assert log.step.tolist() == list(range(1, 25))
    assert set(log.session) == {0, 1} and (log.session[log.step <= killed_at] == 0).all()
    assert (log.session[log.step > killed_at] == 1).all()
    assert log.elapsed_s.is_monotonic_increasing

    # resuming reproduces the uninterrupted run: same data order, augmentation, RNG (dropout) and optimizer state
    train_vlm(cfg, data, None, tmp_path / "work2", tmp_path / "out2")
    from safetensors.torch import load_file

    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "out2" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read_table(tmp_path / "out2" / "train_log.parquet").loss, log.loss, rtol=1e-4)
    # the adapter holds the weight average (resumed with the rest), not the last step's weights
    last = work / "checkpoints" / "step-00000024"
    raw, averaged = load_file(str(last / "trainable.safetensors")), load_file(str(last / "average.safetensors"))
    head = next(k for k in raw if "lm_head" in k)
    saved = a[next(k for k in a if "lm_head" in k)]
    torch.testing.assert_close(saved, averaged[head])
    assert not torch.allclose(saved, raw[head])


def test_micro_batches_split_a_step_without_changing_its_gradient(tiny, sft, tmp_path):
    """Four images per optimizer step, in one pass or in two of two: the same trained weights.

    Every example carries one answer token, so the mean over one pass of four equals the mean of
    two passes' means; only float rounding may differ. A split that does not divide the step is
    refused before anything loads.
    """
    from safetensors.torch import load_file

    outs, logs = {}, {}
    for micro, accum, per_pass in ((4, 1, 4), (2, 2, 2)):  # the same recipe (4 images a step), split or not
        cfg = tiny_cfg(tiny, batch_size=4, grad_accum=1, micro_batch=per_pass, max_steps=2,
                       lora_dropout=0.0, lr=1e-2)
        summary = train_vlm(cfg, sft, None, tmp_path / f"work{micro}", tmp_path / f"out{micro}")
        assert (summary["images_per_pass"], summary["passes_per_step"], summary["steps"]) == (per_pass, accum, 2)
        outs[micro] = load_file(str(Path(summary["adapter_dir"]) / "adapter_model.safetensors"))
        logs[micro] = read_table(tmp_path / f"out{micro}" / "train_log.parquet")
    # the gradient before clipping, by its norm, and the loss: the same step, however it was split
    np.testing.assert_allclose(logs[2]["grad_norm"], logs[4]["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(logs[2]["loss"], logs[4]["loss"], rtol=1e-5)
    assert outs[4].keys() == outs[2].keys()
    moved = 0
    for name, value in outs[4].items():  # Adam divides by the gradient's size: rounding grows near zero
        torch.testing.assert_close(outs[2][name], value, rtol=2e-3, atol=2e-4)
        moved += int("lora_B" in name and bool(value.abs().sum() > 0))
    assert moved  # LoRA's B matrices start at zero: they trained, so the comparison means something
    # "auto" is the configured batch on a CPU, the whole step on CUDA
    auto = tiny_cfg(tiny, batch_size=2, grad_accum=8)
    assert auto.passes("cpu") == (2, 8) and auto.passes("cuda") == (16, 1)
    with pytest.raises(ValueError, match="micro_batch=3 must divide"):
        tiny_cfg(tiny, batch_size=2, grad_accum=8, micro_batch=3)


def test_the_smaller_class_is_oversampled_to_balance_every_epoch(tiny, tmp_path):
    """Three goods to one defect in the SFT data: each epoch trains on as many defects as goods
    (repeats of the defects), the summary says both counts; balance=none trains as the data comes."""
    from saec.tasks.cloud.sft_examples import balance_examples

    lines = write_sft(tmp_path / "d", 16).read_text().splitlines()
    kept = [ln for i, ln in enumerate(lines) if json.loads(ln)["label"] == 0 or i % 6 == 1]  # 8 good, 3 defect
    data = tmp_path / "skewed.jsonl"
    data.write_text("\n".join(kept) + "\n")
    summary = train_vlm(tiny_cfg(tiny, max_steps=1), data, None, tmp_path / "w", tmp_path / "o")
    assert summary["class_counts"] == {"good": 8, "defect": 3}
    assert summary["trained_on"] == {"good": 8, "defect": 8} and summary["examples"] == 16
    plain = train_vlm(tiny_cfg(tiny, max_steps=1, balance="none"), data, None, tmp_path / "w2", tmp_path / "o2")
    assert plain["trained_on"] == plain["class_counts"] and plain["examples"] == 11
    # the repeats: every defect at least once more, none more than twice more, the same draw each time
    from saec.tasks.cloud.models import load_processor

    examples = build_examples(read_sft(data), load_processor(tiny))
    balanced, _ = balance_examples(examples, tiny_cfg(tiny))
    extra = [ex.image for ex in balanced[len(examples):]]
    assert all(ex.label == 1 for ex in balanced[len(examples):]) and len(extra) == 5
    assert {extra.count(img) for img in set(extra)} <= {1, 2} and len(set(extra)) == 3
    assert [ex.image for ex in balance_examples(examples, tiny_cfg(tiny))[0]] == [ex.image for ex in balanced]
