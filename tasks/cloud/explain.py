"""Defect explanations: the instruction, and parsing + validation of what the model generates.

The model is asked for one JSON object `{"bboxes": [[x0, y0, x1, y1], ...], "desc": "..."}`
with pixel coordinates in the image it was shown. Every output is parsed and validated; one
that fails is recorded as invalid together with the reason, never replaced by a default.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

EXPLAIN_INSTRUCTION = (
    "This industrial product image shows a defect. Reply with one JSON object only: "
    '{"bboxes": [[x0, y0, x1, y1], ...], "desc": "..."} where bboxes are the defect regions in '
    "pixel coordinates of this image and desc is a short description of the defect."
)

STATUS_OK = "ok"
STATUS_INVALID = "invalid"
STATUS_NOT_REQUESTED = "not_requested"
STATUS_NOT_DEFECT = "not_defect"


class Explanation(BaseModel):
    """The validated form of an explanation."""

    model_config = ConfigDict(extra="forbid")

    bboxes: list[list[float]] = Field(default_factory=list)
    desc: str

    @field_validator("bboxes")
    @classmethod
    def _boxes(cls, boxes: list[list[float]]) -> list[list[float]]:
        for i, box in enumerate(boxes):
            if len(box) != 4:
                raise ValueError(f"box {i} has {len(box)} numbers, not 4")
            if not all(math.isfinite(v) for v in box):
                raise ValueError(f"box {i} has a non-finite coordinate")
            x0, y0, x1, y1 = box
            if x0 < 0 or y0 < 0 or x1 < x0 or y1 < y0:
                raise ValueError(f"box {i} {box} is not an ordered, non-negative [x0, y0, x1, y1]")
        return boxes

    @field_validator("desc")
    @classmethod
    def _desc(cls, desc: str) -> str:
        if not desc.strip():
            raise ValueError("desc is empty")
        return desc.strip()


@dataclass(frozen=True)
class ParsedExplanation:
    status: str  # STATUS_OK | STATUS_INVALID
    explanation: Explanation | None
    error: str | None


def _first_json_object(text: str) -> str | None:
    """The first balanced {...} in `text` (braces inside JSON strings are respected)."""
    start = text.find("{")
    while start != -1:
        depth, in_str, escaped = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)
    return None


def parse_explanation(text: str, width: int | None = None, height: int | None = None) -> ParsedExplanation:
    """Parse and validate one generated explanation; boxes must lie inside width x height when given."""
    blob = _first_json_object(text)
    if blob is None:
        return ParsedExplanation(STATUS_INVALID, None, "no JSON object in the output")
    try:
        obj = json.loads(blob)
    except json.JSONDecodeError as exc:
        return ParsedExplanation(STATUS_INVALID, None, f"not valid JSON: {exc.msg} at {exc.pos}")
    try:
        exp = Explanation.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "object"
        return ParsedExplanation(STATUS_INVALID, None, f"schema: {where}: {first['msg']}")
    if width is not None and height is not None:
        for i, (x0, y0, x1, y1) in enumerate(exp.bboxes):
            if x1 > width or y1 > height:
                return ParsedExplanation(STATUS_INVALID, None, f"box {i} lies outside the {width}x{height} image")
    return ParsedExplanation(STATUS_OK, exp, None)
