"""The SFT data as the cloud model trains on it: validated rows, chat-rendered examples with their
answer-token counts, explanation turns, balancing, batches and the answer-only loss.

Each SFT row is rendered with the model's own chat template; the loss covers the answer tokens
only (everything before the assistant's answer is masked out), and with `explain_turn` a defect
example gets a follow-up turn asking for its explanation, whose answer carries the loss too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from saec.errors import ActionableError
from saec.prompts import answer
from saec.tasks.cloud.config import CloudTrainConfig
from saec.tasks.cloud.explain import EXPLAIN_INSTRUCTION, ExplainTarget, explanation_text, map_boxes
from saec.tasks.cloud.images import load_rgb
from saec.tasks.cloud.augment import Augmentation


class SFTDataError(ActionableError, ValueError):
    """An SFT file is malformed; the message names the file and line."""


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
    from saec.tasks.cloud.forward import encode

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

    from saec.tasks.cloud.forward import forward_kwargs

    out = base.model(**forward_kwargs(batch), use_cache=False, return_dict=True)
    h = out.last_hidden_state
    target_mask = batch["answer_mask"][:, 1:]  # token t is predicted at position t-1
    h_sel = h[:, :-1][target_mask]
    targets = batch["input_ids"][:, 1:][target_mask]
    logits = base.get_output_embeddings()(h_sel).float()
    return F.cross_entropy(logits, targets), int(targets.numel())
