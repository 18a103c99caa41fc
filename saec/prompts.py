"""The instruction and answer format shared by SFT data, training and scoring.

Training data and the scoring engine must agree on these strings exactly: the engine
reads P(defect) from the next-token logits of the two label strings right after
ANSWER_PREFIX.
"""
from __future__ import annotations

INSTRUCTION = (
    "You are inspecting an industrial product image. "
    "Reply 'Label: 0' if the product is good or 'Label: 1' if it has any defect."
)
ANSWER_PREFIX = "Label: "
LABEL_TEXT = {0: "0", 1: "1"}


def answer(label: int) -> str:
    """The assistant turn for a label: `Label: 0` or `Label: 1`."""
    return ANSWER_PREFIX + LABEL_TEXT[int(label)]


def chat_messages(image_path: str, label: int | None = None) -> list[dict]:
    """Chat messages in the Hugging Face multimodal form; the assistant turn only when a label is given."""
    messages: list[dict] = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image_path},
                {"type": "text", "text": INSTRUCTION},
            ],
        }
    ]
    if label is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer(label)}]})
    return messages
