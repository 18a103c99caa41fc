"""Supervised fine-tuning of the cloud model (QLoRA as in the SAEC scripts), resumable.

`train_vlm` reads the SFT JSONL, renders each conversation with the model's own chat
template and trains on the answer tokens only (everything before the assistant's answer is
masked out of the loss). Every `checkpoint_every` optimizer steps it writes a checkpoint into
`work_dir/checkpoints/`: the trainable weights, optimizer, scheduler, random states, position
in the data order and the step log. A process killed at any point resumes from the last
complete checkpoint when `train_vlm` is called again with the same work_dir; the rows of the
step log after that checkpoint are dropped and training continues exactly where it stood.

Run as a module for a separate process:
    python -m saec.tasks.cloud.train --config cfg.json --train sft_train.jsonl --work W --out O
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from saec.errors import ActionableError
from saec.artifacts.hashing import hash_obj, sha256_file
from saec.prompts import answer
from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig, ModelLoadConfig
from saec.tasks.cloud.explain import EXPLAIN_INSTRUCTION, ExplainTarget, explanation_text, map_boxes
from saec.tasks.cloud.images import DIHEDRAL, load_rgb
from saec.tasks.cloud.models import (
    ADAPTER_RECORD,
    QUANT_SKIP_MODULES,
    VISION_MERGER,
    VISION_TOWER,
    OUTPUT_LAYER,
    LoadedVLM,
    adapter_identity,
    load_vlm,
    lora_target_regex,
)

CHECKPOINTS = "checkpoints"
LOG_NAME = "train_log.parquet"
# Settings that do not change what is learned; a resume may change them.
_RESUME_FREE = {"progress", "checkpoint_every", "keep_checkpoints", "preprocess_workers", "eval_batch_size"}


class SFTDataError(ActionableError, ValueError):
    """An SFT file is malformed; the message names the file and line."""


class ResumeError(ActionableError, RuntimeError):
    """A checkpoint in work_dir belongs to a different configuration or data set."""


# --------------------------------------------------------------------------- data


class SFTRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    image_id: str
    image: str
    label: int
    category: str = ""
    defect_type: str = ""
    messages: list[dict]
    explain: ExplainTarget | None = None  # what the explanation of a defect example should say

    @field_validator("label")
    @classmethod
    def _label(cls, v: int) -> int:
        if v not in (0, 1):
            raise ValueError(f"label must be 0 or 1, not {v}")
        return v


def read_sft(path: Path) -> list[SFTRow]:
    """Validated rows of an SFT JSONL: labels, image files and the assistant answer must agree."""
    rows: list[SFTRow] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = SFTRow.model_validate_json(line)
            except ValidationError as exc:
                raise SFTDataError(f"{path}:{lineno}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
            msgs = row.messages
            if len(msgs) < 2 or msgs[-1].get("role") != "assistant":
                raise SFTDataError(f"{path}:{lineno}: the last message must be the assistant's answer")
            said = "".join(p.get("text", "") for p in msgs[-1]["content"]) if isinstance(msgs[-1]["content"], list) else msgs[-1]["content"]
            if said != answer(row.label):
                raise SFTDataError(f"{path}:{lineno}: label {row.label} but the assistant says {said!r}")
            if row.explain is not None and row.label != 1:
                raise SFTDataError(f"{path}:{lineno}: a good example (label 0) has an explanation target")
            if not Path(row.image).is_file():
                raise SFTDataError(f"{path}:{lineno}: image file {row.image} does not exist")
            rows.append(row)
    if not rows:
        raise SFTDataError(f"{path} holds no examples")
    return rows


@dataclass(frozen=True)
class Example:
    image: str
    label: int
    text: str  # the whole rendered conversation
    n_answer_tokens: int  # trailing tokens of `text` that carry the loss
    category: str = ""
    explain: ExplainTarget | None = None  # the follow-up turn's target, where training asks for one
    messages: tuple[dict, ...] = ()  # the conversation `text` renders (the follow-up turn extends it)


def _answer_tokens(tok, prompt: str, full: str) -> int:
    """How many tokens `full` adds to `prompt` (the answer), checking that they do not merge."""
    if not full.startswith(prompt):
        raise SFTDataError("the chat template renders the conversation differently from its generation prompt")
    ids_full = tok(full).input_ids
    ids_prompt = tok(prompt).input_ids
    if ids_full[: len(ids_prompt)] != ids_prompt:
        raise SFTDataError(f"tokens of the answer {full[len(prompt):]!r} merge with the prompt's last tokens")
    return len(ids_full) - len(ids_prompt)


def build_examples(rows: list[SFTRow], processor) -> list[Example]:
    """Render each conversation; count the answer tokens once per distinct (prompt, answer)."""
    tok = processor.tokenizer
    cache: dict[tuple[str, str], int] = {}
    examples = []
    for row in rows:
        full = processor.apply_chat_template(row.messages, tokenize=False)
        prompt = processor.apply_chat_template(row.messages[:-1], tokenize=False, add_generation_prompt=True)
        key = (prompt, full)
        if key not in cache:
            cache[key] = _answer_tokens(tok, prompt, full)
        examples.append(Example(row.image, row.label, full, cache[key], row.category, row.explain, tuple(row.messages)))
    return examples


class ExplainTurn:
    """The follow-up turn that teaches explanations: after the label answer of a defect example,
    the explanation instruction and, as the answer, the JSON of its target's boxes on the image
    shown (resized and augmented) and its description.

    The turn is rendered by the model's own chat template from the conversation as it stands, so
    it reads exactly as the scoring engine's explanation prompt does. Both answers carry the loss.
    """

    def __init__(self, processor):
        self.processor = processor
        self._cache: dict[tuple[str, str], tuple[str, list[tuple[int, int]]]] = {}

    def render(self, ex: Example, shown: tuple[int, int], aug: "Augmentation | None") -> tuple[str, list[tuple[int, int]]]:
        """(text, loss spans) of the example with its follow-up turn; a span is (tokens after it, length)."""
        assert ex.explain is not None
        boxes = map_boxes(ex.explain, shown, aug.transpose if aug else None, aug.shift if aug else None)
        reply = explanation_text(boxes, ex.explain.desc)
        key = (ex.text, reply)
        if key not in self._cache:
            tok = self.processor.tokenizer
            ask = {"role": "user", "content": [{"type": "text", "text": EXPLAIN_INSTRUCTION}]}
            said = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
            history = list(ex.messages)
            prompt = self.processor.apply_chat_template(history + [ask], tokenize=False, add_generation_prompt=True)
            full = self.processor.apply_chat_template(history + [ask, said], tokenize=False)
            if not prompt.startswith(ex.text):
                raise SFTDataError("the chat template renders the follow-up turn differently from the conversation")
            n_reply = _answer_tokens(tok, prompt, full)
            n_ask = _answer_tokens(tok, ex.text, prompt)
            self._cache[key] = (full, [(0, n_reply), (n_reply + n_ask, ex.n_answer_tokens)])
        return self._cache[key]


def answer_mask(attention_mask, spans):
    """True on the loss positions of each row, counted back from its last attended token.

    `spans` is per row either a count n (the last n attended positions) or a list of
    (after, length) pairs: `length` positions that end `after` positions before the last.
    Left and right padding both work.
    """
    import torch

    rows = [[(0, int(s))] if not isinstance(s, (list, tuple)) else [(int(a), int(n)) for a, n in s] for s in spans]
    width = max(len(r) for r in rows)
    table = torch.zeros((len(rows), width, 2), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            table[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = attention_mask.sum(dim=1, keepdim=True)
    rank = attention_mask.long().cumsum(dim=1)  # 1..len on attended positions
    back = (lengths - rank)[:, :, None]  # 0 at the last attended position
    after, length = table[:, None, :, 0], table[:, None, :, 1]
    inside = ((back >= after) & (back < after + length)).any(dim=2)
    return attention_mask.bool() & inside


def augment_ops(cfg: CloudTrainConfig, epoch: int, examples: list[Example]) -> list[Image.Transpose | None]:
    """The geometric operation for every example in one epoch, fixed by (seed, epoch)."""
    if cfg.augment == "none":
        return [None] * len(examples)
    n_ops = 2 if cfg.augment == "flip" else len(DIHEDRAL)  # "flip": the identity and the left-right mirror
    draws = np.random.default_rng([cfg.seed, epoch, 0xA06]).integers(0, n_ops, len(examples))
    return [DIHEDRAL[d] if ok else None for d, ok in zip(draws, _in_augment_categories(cfg, examples))]


def _in_augment_categories(cfg: CloudTrainConfig, examples: list[Example]) -> list[bool]:
    """Per example: whether its category is one that augmentation applies to."""
    if cfg.augment_categories is None:
        return [True] * len(examples)
    allowed = set(cfg.augment_categories)
    return [ex.category in allowed for ex in examples]


@dataclass(frozen=True)
class Augmentation:
    """What happens to one training image in one epoch, in this order: flip or turn, shift, lighting."""

    transpose: Image.Transpose | None = None
    shift: tuple[int, int] | None = None  # (dx, dy) pixels, the uncovered border mirrored
    lighting: tuple[float, float] | None = None  # (brightness, contrast) factors

    def apply(self, image: Image.Image) -> Image.Image:
        if self.transpose is not None:
            image = image.transpose(self.transpose)
        if self.shift is not None:
            image = shift_image(image, *self.shift)
        if self.lighting is not None:
            image = relight_image(image, *self.lighting)
        return image


def augment_plan(cfg: CloudTrainConfig, epoch: int, examples: list[Example]) -> list[Augmentation | None]:
    """Every example's augmentation in one epoch, fixed by (seed, epoch); None = the image as it is.

    Each kind draws from its own random stream, so turning one on leaves the others' draws alone.
    """
    n = len(examples)
    turns = augment_ops(cfg, epoch, examples)
    applies = _in_augment_categories(cfg, examples)
    shifts: list[tuple[int, int] | None] = [None] * n
    if cfg.augment_shift:
        k = cfg.augment_shift
        d = np.random.default_rng([cfg.seed, epoch, 0x5F7]).integers(-k, k + 1, (n, 2))
        shifts = [(int(x), int(y)) if ok else None for (x, y), ok in zip(d, applies)]
    lights: list[tuple[float, float] | None] = [None] * n
    if cfg.augment_lighting:
        a = cfg.augment_lighting
        f = np.random.default_rng([cfg.seed, epoch, 0xB21]).uniform(1 - a, 1 + a, (n, 2))
        lights = [(float(b), float(c)) if ok else None for (b, c), ok in zip(f, applies)]
    plan = [Augmentation(t, s, li) for t, s, li in zip(turns, shifts, lights)]
    return [None if aug == Augmentation() else aug for aug in plan]


def relight_image(image: Image.Image, brightness: float, contrast: float) -> Image.Image:
    """Contrast scaled about the image's mean, then brightness scaled; clipped to 0..255."""
    arr = np.asarray(image, dtype=np.float32)
    mean = arr.mean()
    out = ((arr - mean) * contrast + mean) * brightness
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode=image.mode)


def shift_image(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """`image` moved right by dx and down by dy pixels, the uncovered border filled by mirroring."""
    if dx == 0 and dy == 0:
        return image
    k = max(abs(dx), abs(dy))
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    if k >= min(h, w):
        raise ValueError(f"a shift of {k} px needs an image larger than {k} px on each side, not {w}x{h}")
    padded = np.pad(arr, ((k, k), (k, k)) + ((0, 0),) * (arr.ndim - 2), mode="reflect")
    y0, x0 = k - dy, k - dx
    return Image.fromarray(np.ascontiguousarray(padded[y0 : y0 + h, x0 : x0 + w]), mode=image.mode)


def _check_augment(cfg: CloudTrainConfig, examples: list[Example]) -> int:
    """How many examples augmentation may transform; warns when none of the listed categories occur."""
    if cfg.augment == "none" and not cfg.augment_shift and not cfg.augment_lighting:
        return 0
    n = sum(_in_augment_categories(cfg, examples))
    if n == 0 and cfg.augment_categories is not None:
        present = sorted({ex.category for ex in examples})
        warnings.warn(f"augmentation changes nothing: none of augment_categories "
                      f"{list(cfg.augment_categories)} occurs in the training data (its categories: {present})",
                      stacklevel=3)
    return n


def balance_examples(examples: list[Example], cfg: CloudTrainConfig) -> tuple[list[Example], dict]:
    """With `cfg.balance="oversample"`, the examples plus repeats of the smaller class's, drawn without
    replacement (then again) from a generator seeded by `cfg.seed`, until both classes are as many;
    returns them and {"class_counts": in the SFT data, "trained_on": per epoch}."""
    counts = {"good": sum(ex.label == 0 for ex in examples), "defect": sum(ex.label == 1 for ex in examples)}
    if cfg.balance == "none" or not counts["good"] or not counts["defect"] or counts["good"] == counts["defect"]:
        return examples, {"class_counts": counts, "trained_on": dict(counts)}
    minority = 0 if counts["good"] < counts["defect"] else 1
    pool = [i for i, ex in enumerate(examples) if ex.label == minority]
    need = abs(counts["good"] - counts["defect"])
    rng = np.random.default_rng([cfg.seed, 0xBA1])
    draws = np.concatenate([rng.permutation(len(pool)) for _ in range(math.ceil(need / len(pool)))])[:need]
    balanced = examples + [examples[pool[j]] for j in draws]
    bigger = max(counts.values())
    return balanced, {"class_counts": counts, "trained_on": {"good": bigger, "defect": bigger}}


def prepare_batch(processor, family: str, examples: list[Example], resize: int | None,
                  augs: list[Augmentation | None] | None = None, explain: ExplainTurn | None = None) -> dict:
    """Decode, resize (and augment by `augs`) and encode one micro-batch; adds `answer_mask` for the loss.

    With `explain`, every example that has an explanation target gets its follow-up turn.
    """
    from saec.tasks.cloud.engine import encode

    images = [load_rgb(ex.image, resize) for ex in examples]
    augs = augs if augs is not None else [None] * len(examples)
    shown = [im.size for im in images]
    images = [im if aug is None else aug.apply(im) for im, aug in zip(images, augs)]
    texts, spans = [], []
    for ex, size, aug in zip(examples, shown, augs):
        if explain is not None and ex.explain is not None:
            text, span = explain.render(ex, size, aug)
        else:
            text, span = ex.text, ex.n_answer_tokens
        texts.append(text)
        spans.append(span)
    batch = encode(processor, family, texts, images)
    batch["answer_mask"] = answer_mask(batch["attention_mask"], spans)
    return batch


def answer_loss(base, batch: dict) -> tuple[Any, int]:
    """Mean cross-entropy over the answer tokens; the output layer runs on those positions only."""
    import torch.nn.functional as F

    from saec.tasks.cloud.engine import _forward_kwargs

    out = base.model(**_forward_kwargs(batch), use_cache=False, return_dict=True)
    h = out.last_hidden_state
    target_mask = batch["answer_mask"][:, 1:]  # token t is predicted at position t-1
    h_sel = h[:, :-1][target_mask]
    targets = batch["input_ids"][:, 1:][target_mask]
    logits = base.get_output_embeddings()(h_sel).float()
    return F.cross_entropy(logits, targets), int(targets.numel())


# --------------------------------------------------------------------------- model set-up


def _lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def setup_trainable(loaded: LoadedVLM, cfg: CloudTrainConfig):
    """Make the chosen parameters trainable; returns the (possibly PEFT-wrapped) model."""
    import torch

    model = loaded.model
    family = loaded.family
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.trainable == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        _drop_input_grad_hooks(model)
        return model

    from peft import LoraConfig, get_peft_model

    modules_to_save = {
        "lora": None,
        "lora+merger": [VISION_MERGER[family]],
        "lora+vision": [VISION_TOWER[family]],
    }[cfg.trainable]
    if cfg.train_output_layer:
        modules_to_save = (modules_to_save or []) + list(OUTPUT_LAYER[family])
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        target_modules=lora_target_regex(cfg.lora_mlp),
        modules_to_save=modules_to_save,
    )
    with warnings.catch_warnings():  # PEFT reads a property that transformers has renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lora)
    _drop_input_grad_hooks(model)
    _check_trainable(model, loaded, cfg)
    # Trainable weights in float32 (LoRA is already); the frozen base keeps its dtype.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _drop_input_grad_hooks(model) -> int:
    """Remove the hooks that make every input embedding's output require grad.

    transformers (when checkpointing is enabled) and PEFT hook every input embedding, the vision
    tower's patch embedding included. That keeps a frozen vision tower in the autograd graph (its
    activations stored, or recomputed under checkpointing) although nothing in it trains.
    Non-reentrant checkpointing needs no such hook, so none is kept.
    """
    removed = 0
    for module in model.modules():
        for key, fn in list(module._forward_hooks.items()):
            if getattr(fn, "__name__", "") in {"make_inputs_require_grads", "make_inputs_require_grad"}:
                del module._forward_hooks[key]
                removed += 1
    return removed


def _check_trainable(model, loaded: LoadedVLM, cfg: CloudTrainConfig) -> None:
    """LoRA sits on every language-model projection asked for and nowhere else; saved modules are unquantized."""
    from peft.tuners.lora import LoraLayer

    lora_names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    vision = VISION_TOWER[loaded.family]
    stray = [n for n in lora_names if f".{vision}." in f".{n}" or ".visual." in n or ".vision_tower." in n]
    if stray:
        raise RuntimeError(f"LoRA landed inside the vision tower: {stray[:4]}")
    text_cfg = loaded.base.config.get_text_config()
    expected = text_cfg.num_hidden_layers * (7 if cfg.lora_mlp else 4)
    if len(lora_names) != expected:
        raise RuntimeError(f"LoRA wraps {len(lora_names)} modules, expected {expected}: {lora_names[:8]}")
    if loaded.quantization == "nf4":
        import bitsandbytes as bnb

        for prefix in QUANT_SKIP_MODULES[loaded.family]:
            quantized = [n for n, m in model.named_modules() if f".{prefix}." in f".{n}." and isinstance(m, bnb.nn.Linear4bit)]
            if quantized:
                raise RuntimeError(f"{prefix} must not be 4-bit quantized, but {quantized[:3]} are")


# --------------------------------------------------------------------------- checkpoints


def _save_rng_state(folder: Path) -> None:
    """The random states, without pickle: torch's and numpy's key arrays in rng.safetensors, the rest in rng.json."""
    import torch
    from safetensors.torch import save_file

    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    n_cuda = 0
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state_all()
        tensors |= {f"cuda.{i}": t for i, t in enumerate(cuda)}
        n_cuda = len(cuda)
    save_file(tensors, str(folder / "rng.safetensors"))
    record = {"python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
              "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached_gaussian)},
              "cuda_devices": n_cuda}
    (folder / "rng.json").write_text(json.dumps(record))


def _load_rng_state(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    record = json.loads((folder / "rng.json").read_text())
    tensors = load_file(str(folder / "rng.safetensors"))
    py, npy = record["python"], record["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    if record["cuda_devices"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(record["cuda_devices"])])


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The data order of one epoch: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next micro-batch belongs to
    next_micro: int = 0  # index of the next micro-batch within that epoch
    elapsed_s: float = 0.0
    session: int = 0


def _checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


class WeightAverage:
    """Exponential moving average of the trained parameters, updated after every optimizer step.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so the first steps' random
    weights do not linger in the average."""

    def __init__(self, named: list[tuple[str, Any]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone().float() for p in self.params]

    def update(self, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    def state_dict(self) -> dict:
        return {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, weights: dict) -> None:
        if set(weights) != set(self.names):
            raise ResumeError("the checkpoint's weight average holds other parameters than the model trains")
        for n, s in zip(self.names, self.shadow):
            s.copy_(weights[n])

    def copy_to_model(self) -> None:
        import torch

        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))


def save_checkpoint(work_dir: Path, state: TrainState, model, optimizer, scheduler, log_rows: list[dict],
                    fingerprint: dict, keep: int, seed: int, n_examples: int,
                    average: WeightAverage | None = None) -> Path:
    """Write one checkpoint folder atomically (rename of a complete folder), then prune old ones."""
    import torch
    from safetensors.torch import save_file

    from saec.artifacts.store import write_table

    root = work_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    if average is not None:
        save_file(average.state_dict(), str(tmp / "average.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    _save_rng_state(tmp)
    _log_frame_write(log_rows, tmp / LOG_NAME)
    record = {"state": state.__dict__, "fingerprint": fingerprint, "seed": seed,
              "order": epoch_order(seed, state.epoch, n_examples).tolist()}  # the data order of the next epoch step
    (tmp / "state.json").write_text(json.dumps(record))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_table(_log_frame(log_rows), "cloud_train_log", work_dir / LOG_NAME)
    for old in _checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, fingerprint: dict,
                    average: WeightAverage | None = None) -> tuple[TrainState, list[dict]]:
    import torch
    from safetensors.torch import load_file

    from saec.artifacts.store import read_table

    if not (ckpt / "rng.json").is_file():
        kept = "in rng.pt, an older format that is no longer read" if (ckpt / "rng.pt").exists() else "nowhere"
        raise ResumeError(f"checkpoint {ckpt} keeps its random states {kept}; delete {ckpt.parent} to start over")
    record = json.loads((ckpt / "state.json").read_text())
    theirs = record["fingerprint"]
    diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
    if diff:
        raise ResumeError(
            f"checkpoint {ckpt} was written by a run with different {diff}; "
            "use a fresh work_dir (or delete its checkpoints) to start over"
        )
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        raise ResumeError(f"checkpoint {ckpt} holds other trainable parameters than the model has")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    if average is not None:
        if not (ckpt / "average.safetensors").is_file():
            raise ResumeError(f"checkpoint {ckpt} holds no weight average (ema_decay)")
        average.load_state_dict(load_file(str(ckpt / "average.safetensors")))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    _load_rng_state(ckpt)
    state = TrainState(**record["state"])
    if record["order"] != epoch_order(record["seed"], state.epoch, len(record["order"])).tolist():
        raise ResumeError(f"checkpoint {ckpt}: the data order cannot be reproduced (numpy's generator changed?)")
    rows = read_table(ckpt / LOG_NAME).to_dict("records") if (ckpt / LOG_NAME).exists() else []
    rows = [r for r in rows if r["step"] <= state.step]
    return state, rows


def _log_frame(rows: list[dict]):
    import pandas as pd

    from saec.artifacts.schemas import SCHEMAS

    cols = SCHEMAS["cloud_train_log"].names
    return pd.DataFrame(rows, columns=cols)


def _log_frame_write(rows: list[dict], path: Path) -> None:
    from saec.artifacts.store import write_table

    write_table(_log_frame(rows), "cloud_train_log", path)


# --------------------------------------------------------------------------- the loop


def _prefetch(fn, jobs: list, pool: ThreadPoolExecutor, depth: int) -> Iterator[Any]:
    """fn(job) for each job, in order, computed up to `depth` jobs ahead in `pool`'s threads."""
    pending: deque[Future] = deque()
    it = iter(jobs)
    try:
        for job in it:
            pending.append(pool.submit(fn, job))
            if len(pending) >= depth:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result
    finally:
        for fut in pending:
            fut.cancel()
        for fut in pending:
            if not fut.cancelled():
                fut.exception()


def _fingerprint(cfg: CloudTrainConfig, train_jsonl: Path, model_id: str) -> dict:
    learn = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _RESUME_FREE}
    return {"config": hash_obj(learn), "train_data": sha256_file(train_jsonl), "base_model": model_id}


def train_vlm(cfg: CloudTrainConfig, train_jsonl: Path, val_jsonl: Path | None, work_dir: Path, out_dir: Path) -> dict:
    """Fine-tune the cloud model; resumes from work_dir's last checkpoint; writes out_dir/adapter (or model).

    Returns a summary: paths written, steps, losses, timing, identities, validation metrics.
    """
    import torch
    from tqdm.auto import tqdm

    train_jsonl, work_dir, out_dir = Path(train_jsonl), Path(work_dir), Path(out_dir)
    rows = read_sft(train_jsonl)
    val_rows = read_sft(Path(val_jsonl)) if val_jsonl else None
    work_dir.mkdir(parents=True, exist_ok=True)

    _seed_all(cfg.seed)
    load_cfg = ModelLoadConfig(
        model=cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        attn_implementation=cfg.attn_implementation,
        quantization=cfg.quantization,
    )
    loaded = load_vlm(load_cfg)
    if loaded.quantization == "nf4" and cfg.trainable == "full":
        raise ValueError("trainable='full' cannot train 4-bit weights: use quantization='none'")
    processor = loaded.processor
    processor.tokenizer.padding_side = "right"
    examples, classes = balance_examples(build_examples(rows, processor), cfg)
    augmented = _check_augment(cfg, examples)
    explained = sum(ex.explain is not None for ex in examples) if cfg.explain_turn else 0
    if cfg.explain_turn and not explained:
        warnings.warn(f"explain_turn teaches nothing: no example of {train_jsonl} has an explanation target "
                      "(the SFT stage writes them for defect images with ground-truth masks)", stacklevel=2)
    fast_path = None
    if loaded.device.type == "cuda" and loaded.family == "qwen2_5_vl":
        # the scoring engine's uncompiled vision path (batched windows, patch embedding as one matmul);
        # the frozen tower's forward is the same computation, only without a Python loop per window
        from saec.tasks.cloud.fast import install_fast_path

        fast_path = install_fast_path(loaded.model)["installed"]
    model = setup_trainable(loaded, cfg)
    loaded.model = model
    base = loaded.base
    device = loaded.device
    per_pass, passes = cfg.passes(device.type)
    autocast = device.type == "cuda" and loaded.dtype != torch.float32

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for _, p in named)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        [p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    n_micro = math.ceil(len(examples) / per_pass)
    steps_per_epoch = math.ceil(n_micro / passes)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_lr_lambda, warmup=warmup, total=total_steps, kind=cfg.lr_scheduler)
    )

    average = WeightAverage(named, cfg.ema_decay) if cfg.ema_decay is not None else None
    fingerprint = _fingerprint(cfg, train_jsonl, loaded.model_id) | {"images_per_pass": per_pass}
    state, log_rows = TrainState(), []
    for stale in (work_dir / CHECKPOINTS).glob(".tmp-step-*"):  # a checkpoint cut off mid-write
        shutil.rmtree(stale, ignore_errors=True)
    ckpts = _checkpoint_dirs(work_dir / CHECKPOINTS)
    resumed_from = None
    if ckpts:
        state, log_rows = load_checkpoint(ckpts[-1], model, optimizer, scheduler, fingerprint, average)
        state.session += 1
        resumed_from = state.step

    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc="cloud training", unit="step",
               disable=not cfg.progress, dynamic_ncols=True)
    t_session = time.perf_counter()
    elapsed_at_start = state.elapsed_s

    def elapsed() -> float:
        return elapsed_at_start + time.perf_counter() - t_session

    explain = ExplainTurn(processor) if cfg.explain_turn else None

    def make(job: tuple[list, list[int]]) -> dict:
        augs, idx = job
        return prepare_batch(processor, loaded.family, [examples[i] for i in idx], cfg.resize, [augs[i] for i in idx],
                             explain)

    last_ckpt_step = state.step if resumed_from is not None else -1
    pool = ThreadPoolExecutor(cfg.preprocess_workers, thread_name_prefix="saec-train-data")
    try:
        while state.step < total_steps and state.epoch < cfg.epochs:
            order = epoch_order(cfg.seed, state.epoch, len(examples))
            augs = augment_plan(cfg, state.epoch, examples)
            micro = [(augs, order[i : i + per_pass].tolist()) for i in range(0, len(order), per_pass)]
            start = state.next_micro
            window_losses: list[float] = []
            window_stats = {"images": 0, "answer_tokens": 0, "tokens": 0}
            t_step = time.perf_counter()
            if device.type == "cpu":
                # Prefetch threads overlap data preparation with a GPU's work; on a CPU they take cores
                # from the intra-op threads and slow every step (benchmarks/cloud_cpu_train.py: 1.47x on 2 cores).
                batches = map(make, micro[start:])
            else:
                batches = _prefetch(make, micro[start:], pool, cfg.preprocess_workers + 1)
            for k, batch in enumerate(batches, start=start):
                window_start = (k // passes) * passes
                window_len = min(passes, n_micro - window_start)
                batch = {key: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for key, v in batch.items()}
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(loaded.dtype)
                with torch.autocast(device.type, dtype=loaded.dtype, enabled=autocast):
                    loss, n_tok = answer_loss(base, batch)
                (loss / window_len).backward()
                window_losses.append(float(loss.detach()))
                window_stats["images"] += int(batch["input_ids"].shape[0])
                window_stats["answer_tokens"] += n_tok
                window_stats["tokens"] += int(batch["attention_mask"].sum())
                if k + 1 - window_start < window_len:
                    continue
                # ---- optimizer step
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm))
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if average is not None:
                    average.update(state.step)
                state.next_micro = k + 1
                if state.next_micro >= n_micro:
                    state.epoch, state.next_micro = state.epoch + 1, 0
                dt = time.perf_counter() - t_step
                state.elapsed_s = elapsed()
                log_rows.append(
                    {
                        "step": state.step,
                        "epoch": state.epoch if state.next_micro else state.epoch - 1,
                        "loss": float(np.mean(window_losses)),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "images": window_stats["images"],
                        "answer_tokens": window_stats["answer_tokens"],
                        "tokens": window_stats["tokens"],
                        "images_per_s": window_stats["images"] / dt,
                        "tokens_per_s": window_stats["tokens"] / dt,
                        "step_seconds": dt,
                        "elapsed_s": state.elapsed_s,
                        "session": state.session,
                    }
                )
                bar.update(1)
                bar.set_postfix(loss=f"{log_rows[-1]['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{log_rows[-1]['images_per_s']:.1f}")
                done = state.step >= total_steps
                if state.step % cfg.checkpoint_every == 0 or done:
                    save_checkpoint(work_dir, state, model, optimizer, scheduler, log_rows, fingerprint,
                                    cfg.keep_checkpoints, cfg.seed, len(examples), average)
                    last_ckpt_step = state.step
                window_losses, window_stats = [], {"images": 0, "answer_tokens": 0, "tokens": 0}
                t_step = time.perf_counter()
                if done:
                    break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    if last_ckpt_step != state.step:  # e.g. resumed at the end: make the final state durable too
        save_checkpoint(work_dir, state, model, optimizer, scheduler, log_rows, fingerprint,
                        cfg.keep_checkpoints, cfg.seed, len(examples), average)

    model.eval()
    if average is not None:  # the checkpoints keep the last step's weights; the outputs get the average
        average.copy_to_model()
    written = _write_outputs(model, loaded, cfg, out_dir, work_dir)
    summary = {
        **written,
        "steps": state.step,
        "total_steps": total_steps,
        "epochs_done": state.epoch,
        "examples": len(examples),
        "class_counts": classes["class_counts"],
        "trained_on": classes["trained_on"],
        "augmented_examples": augmented,
        "explained_examples": explained,
        "resumed_from_step": resumed_from,
        "sessions": state.session + 1,
        "train_seconds": state.elapsed_s,
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "images_per_pass": per_pass,
        "passes_per_step": passes,
        "vision_fast_path": fast_path,
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "quantization": loaded.quantization,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(device),
        "model_id": loaded.model_id,
        "config": cfg.model_dump(mode="json"),
    }
    if val_rows is not None:
        summary["val"] = evaluate(loaded, cfg, val_rows)
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _write_outputs(model, loaded: LoadedVLM, cfg: CloudTrainConfig, out_dir: Path, work_dir: Path) -> dict:
    """out_dir/adapter (PEFT, loadable with PeftModel.from_pretrained) or out_dir/model; the step log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Saved modules go back to the model's dtype (they trained in float32).
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" not in name and p.dtype != loaded.dtype:
            p.data = p.data.to(loaded.dtype)
    result: dict[str, Any] = {}
    if cfg.trainable == "full":
        target = out_dir / "model"
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target, safe_serialization=True)
        for f in loaded.model_dir.iterdir():  # processor, tokenizer, chat template: as the base has them
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in {
                "config.json", "model.safetensors.index.json", "generation_config.json"
            }:
                shutil.copy2(f, target / f.name)
        result["model_dir"] = str(target)
        result["adapter_dir"] = None
        result["adapter_id"] = None
    else:
        target = out_dir / "adapter"
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target)
        record = {
            "base_model_id": loaded.model_id,
            "base_model_dir": str(loaded.model_dir),
            "family": loaded.family,
            "trainable": cfg.trainable,
            "lora_target_modules": lora_target_regex(cfg.lora_mlp),
            "train_config": cfg.model_dump(mode="json"),
        }
        (target / ADAPTER_RECORD).write_text(json.dumps(record, indent=2))
        result["adapter_dir"] = str(target)
        result["adapter_id"] = adapter_identity(target)
        result["model_dir"] = str(loaded.model_dir)
    shutil.copy2(work_dir / LOG_NAME, out_dir / LOG_NAME)
    result["train_log"] = str(out_dir / LOG_NAME)
    return result


def evaluate(loaded: LoadedVLM, cfg: CloudTrainConfig, rows: list[SFTRow]) -> dict:
    """Accuracy of the trained model on SFT rows, through the scoring engine (P(defect) >= 0.5)."""
    from saec.tasks.cloud.engine import VLMScorer

    score_cfg = CloudScoreConfig(
        model=str(loaded.model_dir),
        resize=cfg.resize,
        batch_size=cfg.eval_batch_size,
        threshold=0.5,
        impl="fast",
        progress=cfg.progress,
    )
    scorer = VLMScorer(score_cfg, loaded=loaded, merge_adapter=False)
    scores = scorer.score([r.image for r in rows])
    return classification_metrics(np.array([r.label for r in rows]), scores["pred"], scores["p_defect"])


def classification_metrics(labels: np.ndarray, pred: np.ndarray, p: np.ndarray) -> dict:
    good, bad = labels == 0, labels == 1
    acc_good = float((pred[good] == 0).mean()) if good.any() else None
    acc_bad = float((pred[bad] == 1).mean()) if bad.any() else None
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()),
        "accuracy_good": acc_good,
        "accuracy_defect": acc_bad,
        "balanced_accuracy": (acc_good + acc_bad) / 2 if acc_good is not None and acc_bad is not None else None,
        "mean_p_defect_good": float(p[good].mean()) if good.any() else None,
        "mean_p_defect_defect": float(p[bad].mean()) if bad.any() else None,
    }


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune the cloud model (resumable).")
    parser.add_argument("--config", required=True, help="JSON file of CloudTrainConfig fields")
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--val", type=Path, default=None)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    from saec.env import configure_offline

    configure_offline()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CloudTrainConfig.model_validate_json(Path(args.config).read_text())
    summary = train_vlm(cfg, args.train, args.val, args.work, args.out)
    print(json.dumps({k: summary[k] for k in ("steps", "resumed_from_step", "sessions", "final_loss", "adapter_dir")}))


if __name__ == "__main__":
    main()
