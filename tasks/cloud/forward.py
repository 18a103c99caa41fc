"""What the scoring engine and the training share: the scoring prompt (`PromptSpec`), batches
encoded by the model's processor or built once per image size (`StaticPrompt`), and the forward
passes that turn a batch into the two label logits, the plain one and the fast one.
"""
from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass
from typing import Any


from saec.prompts import ANSWER_PREFIX, LABEL_TEXT, chat_messages

IMAGE_PLACEHOLDER = "image"  # the chat template only needs to see that a turn holds an image


class PromptError(RuntimeError):
    """The model's tokenizer or chat template cannot express the scoring prompt as required."""


# --------------------------------------------------------------------------- prompt


@dataclass(frozen=True)
class PromptSpec:
    """The scoring prompt of one model and the token ids the engine reads."""

    prefix: str  # rendered text: template + generation prompt + answer prefix (one image placeholder)
    label_ids: tuple[int, int]  # token ids of "0" and "1" right after the prefix
    n_answer_prefix_tokens: int  # how many tokens `Label: ` is at the end of the prefix
    matches_generation_prompt: bool  # prefix == generation prompt + ANSWER_PREFIX


def render_chat(processor, messages: list[dict], generation: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def build_prompt_spec(processor) -> PromptSpec:
    """Derive the scoring prompt from the model's own chat template and tokenizer.

    The prefix is the common part of the two rendered conversations that answer `Label: 0` and
    `Label: 1`, i.e. exactly what training shows the model before the label. The label ids are
    the tokens where the tokenizations of prefix+"0" and prefix+"1" differ; each must be a single
    token appended to the tokenization of the prefix, or the prompt is rejected.
    """
    tok = processor.tokenizer
    rendered = [render_chat(processor, chat_messages(IMAGE_PLACEHOLDER, label), False) for label in (0, 1)]
    prefix = os.path.commonprefix(rendered)
    if not prefix.endswith(ANSWER_PREFIX) or rendered[0][len(prefix) :][:1] != LABEL_TEXT[0]:
        raise PromptError(
            f"the chat template does not render the answer as {ANSWER_PREFIX!r}+label: {rendered[0][-80:]!r}"
        )
    generation = render_chat(processor, chat_messages(IMAGE_PLACEHOLDER)[:1], True)
    ids_prefix = tok(prefix).input_ids
    label_ids = []
    for label in (0, 1):
        ids = tok(prefix + LABEL_TEXT[label]).input_ids
        if len(ids) != len(ids_prefix) + 1 or ids[:-1] != ids_prefix:
            raise PromptError(
                f"label {LABEL_TEXT[label]!r} is not a single token after {ANSWER_PREFIX!r}: "
                f"{tok.convert_ids_to_tokens(ids[len(ids_prefix) - 2 :])}"
            )
        label_ids.append(ids[-1])
    if label_ids[0] == label_ids[1]:
        raise PromptError("the labels '0' and '1' map to the same token")
    # The answer prefix's tokens: those where the prompt without it stops agreeing (a tokenizer
    # may fold the space before "Label" into the first answer token).
    ids_head = tok(prefix[: -len(ANSWER_PREFIX)]).input_ids
    common = len(os.path.commonprefix([ids_prefix, ids_head]))
    if common == len(ids_prefix):
        raise PromptError(f"{ANSWER_PREFIX!r} adds no tokens to the prompt")
    return PromptSpec(
        prefix=prefix,
        label_ids=(label_ids[0], label_ids[1]),
        n_answer_prefix_tokens=len(ids_prefix) - common,
        matches_generation_prompt=prefix == generation + ANSWER_PREFIX,
    )


# --------------------------------------------------------------------------- batches


def last_real_index(attention_mask) -> Any:
    """Index of each row's last attended position: right or left padding, or none."""
    import torch

    t = attention_mask.shape[1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def add_mm_token_type_ids(batch: dict, family: str, image_token_id: int | None) -> dict:
    """Qwen2.5-VL needs mm_token_type_ids (1 on image tokens) for its 3-D positions; add them if absent."""
    if family == "qwen2_5_vl" and "mm_token_type_ids" not in batch and image_token_id is not None:
        batch["mm_token_type_ids"] = (batch["input_ids"] == image_token_id).long()
    return batch


_LOCAL = threading.local()


def thread_processor(processor):
    """A copy of `processor` owned by the calling thread.

    A Rust tokenizer raises "Already borrowed" when two threads use it at once, so every
    worker thread that encodes batches gets its own copy (made once per thread).
    """
    if threading.current_thread() is threading.main_thread():
        return processor
    copies = getattr(_LOCAL, "processors", None)
    if copies is None:
        copies = _LOCAL.processors = {}
    if id(processor) not in copies:
        copies[id(processor)] = (processor, copy.deepcopy(processor))
    return copies[id(processor)][1]


def encode(processor, family: str, texts: list[str], images: list, pin: bool = False) -> dict:
    """Processor call for one batch: token ids with expanded image tokens, pixel tensors."""
    enc = thread_processor(processor)(text=texts, images=images, return_tensors="pt", padding=True)
    batch = {k: v for k, v in enc.items()}
    add_mm_token_type_ids(batch, family, getattr(processor, "image_token_id", None))
    if pin:
        batch = {k: (v.pin_memory() if hasattr(v, "pin_memory") else v) for k, v in batch.items()}
    return batch


def to_device(batch: dict, device, dtype) -> dict:
    import torch

    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif v.is_floating_point():
            out[k] = v.to(device=device, dtype=dtype, non_blocking=True)
        else:
            out[k] = v.to(device=device, non_blocking=True)
    return out


class StaticPrompt:
    """The scoring prompt's token tensors for images of one size, built once by the processor.

    input_ids, attention_mask, image_grid_thw and mm_token_type_ids of one row (the processor's
    own output for one image of that size), repeated for a batch of same-size images.
    """

    def __init__(self, processor, family: str, prefix: str, height: int, width: int):
        from PIL import Image

        enc = encode(processor, family, [prefix], [Image.new("RGB", (width, height))])
        self.size = (height, width)
        self.row = {k: v for k, v in enc.items() if k != "pixel_values" and hasattr(v, "expand")}

    def batch(self, n: int) -> dict:
        """The row repeated n times."""
        return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.row.items()}


def forward_kwargs(batch: dict) -> dict:
    keep = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "image_sizes",
            "position_ids")
    return {k: batch[k] for k in keep if k in batch}


# --------------------------------------------------------------------------- forward passes


def hidden_at(model, batch: dict, positions):
    """Decoder hidden states at `positions` ([B, K] indices) without the output layer: [B, K, H]."""
    import torch

    from saec.tasks.cloud.fast import keep_positions

    with keep_positions(model, positions) as kept:  # a compiled last layer computes these positions only
        out = model.model(**forward_kwargs(batch), use_cache=False, return_dict=True)
    h = out.last_hidden_state
    if kept.trimmed:
        return h
    rows = torch.arange(h.shape[0], device=h.device)[:, None]
    return h[rows, positions]


def label_logits_fast(model, batch: dict, label_rows) -> Any:
    """[B, 2] logits of "0" and "1" at the last real position: two rows of the output layer only."""
    last = last_real_index(batch["attention_mask"])
    h = hidden_at(model, batch, last[:, None])[:, 0]
    logits = h.float() @ label_rows.weight.T
    if label_rows.bias is not None:
        logits = logits + label_rows.bias
    return logits


def label_logits_reference(model, batch: dict, label_ids: tuple[int, int]) -> Any:
    """[B, 2] logits from the plain forward: full-vocabulary logits everywhere, two columns picked."""
    import torch

    logits = model(**forward_kwargs(batch), use_cache=False, return_dict=True).logits
    last = last_real_index(batch["attention_mask"])
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last][:, list(label_ids)].float()


def answer_logprobs(model, batch: dict, spec: PromptSpec, fast: bool) -> Any:
    """[B, 2] summed log-probabilities of the full answers `Label: 0` and `Label: 1`.

    Only the positions that predict the answer tokens get full-vocabulary logits (fast), or
    they are picked from the full logits (reference).
    """
    import torch

    n = spec.n_answer_prefix_tokens
    last = last_real_index(batch["attention_mask"])
    offsets = torch.arange(-n, 1, device=last.device)
    positions = last[:, None] + offsets  # predict prefix tokens at -n..-1 and the label at 0
    rows = torch.arange(last.shape[0], device=last.device)[:, None]
    if fast:
        h = hidden_at(model, batch, positions)
        logits = model.get_output_embeddings()(h)
    else:
        logits = model(**forward_kwargs(batch), use_cache=False, return_dict=True).logits[rows, positions]
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, n+1, V]
    targets = batch["input_ids"][rows, positions[:, 1:]]  # the answer-prefix tokens themselves
    prefix_lp = logp[:, :-1].gather(-1, targets[..., None]).squeeze(-1).sum(dim=1)
    label_lp = logp[:, -1][:, list(spec.label_ids)]
    return prefix_lp[:, None] + label_lp
