"""Defect explanations: the instruction, and parsing + validation of what the model generates.

The model is asked for one JSON object `{"bboxes": [[x0, y0, x1, y1], ...], "desc": "..."}`
with pixel coordinates in the image it was shown. Every output is parsed and validated; one
that fails is recorded as invalid together with the reason, never replaced by a default.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EXPLAIN_INSTRUCTION = (
    "This industrial product image shows a defect. Reply with one JSON object only: "
    '{"bboxes": [[x0, y0, x1, y1], ...], "desc": "..."} where bboxes are the defect regions in '
    "pixel coordinates of this image and desc is a short description of the defect."
)

STATUS_OK = "ok"
STATUS_INVALID = "invalid"
STATUS_NOT_REQUESTED = "not_requested"
STATUS_NOT_DEFECT = "not_defect"


def _check_boxes(boxes: list[list[float]]) -> list[list[float]]:
    for i, box in enumerate(boxes):
        if len(box) != 4:
            raise ValueError(f"box {i} has {len(box)} numbers, not 4")
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"box {i} has a non-finite coordinate")
        x0, y0, x1, y1 = box
        if x0 < 0 or y0 < 0 or x1 < x0 or y1 < y0:
            raise ValueError(f"box {i} {box} is not an ordered, non-negative [x0, y0, x1, y1]")
    return boxes


def _first_outside(boxes: list[list[float]], width: float, height: float) -> int | None:
    """Index of the first box that reaches past a width x height image, or None."""
    return next((i for i, (_x0, _y0, x1, y1) in enumerate(boxes) if x1 > width or y1 > height), None)


def _check_desc(desc: str) -> str:
    if not desc.strip():
        raise ValueError("desc is empty")
    return desc.strip()


class Explanation(BaseModel):
    """The validated form of an explanation."""

    model_config = ConfigDict(extra="forbid")

    bboxes: list[list[float]] = Field(default_factory=list)
    desc: str

    @field_validator("bboxes")
    @classmethod
    def _boxes(cls, boxes: list[list[float]]) -> list[list[float]]:
        return _check_boxes(boxes)

    @field_validator("desc")
    @classmethod
    def _desc(cls, desc: str) -> str:
        return _check_desc(desc)


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
    if width is not None and height is not None and (i := _first_outside(exp.bboxes, width, height)) is not None:
        return ParsedExplanation(STATUS_INVALID, None, f"box {i} lies outside the {width}x{height} image")
    return ParsedExplanation(STATUS_OK, exp, None)


# --------------------------------------------------------------------------- training targets


class ExplainTarget(Explanation):
    """What a defect image's explanation should say: its defect regions and type.

    Boxes are in pixel coordinates of the image file (`width` x `height`), edges inclusive of
    the first and exclusive of the last pixel, as a ground-truth mask's regions give them, and
    must lie inside it. Training maps them onto the image it shows the model (resized, flipped,
    turned, shifted).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bboxes: list[list[float]]
    width: int = Field(gt=0)
    height: int = Field(gt=0)

    @model_validator(mode="after")
    def _inside(self) -> "ExplainTarget":
        if (i := _first_outside(self.bboxes, self.width, self.height)) is not None:
            raise ValueError(f"box {i} {self.bboxes[i]} lies outside the {self.width}x{self.height} image")
        return self


def describe_defect(defect_type: str) -> str:
    """The explanation's description of a defect type: its folder name in words ("metal contamination")."""
    return defect_type.replace("_", " ").strip()


# PIL's flips and quarter turns as maps of a point (x, y) of a w x h image (continuous pixel
# coordinates); ROTATE_90 turns counter-clockwise, as PIL does. Returns the point and new size.
_POINT_MAPS = {
    "FLIP_LEFT_RIGHT": lambda x, y, w, h: (w - x, y, w, h),
    "FLIP_TOP_BOTTOM": lambda x, y, w, h: (x, h - y, w, h),
    "ROTATE_90": lambda x, y, w, h: (y, w - x, h, w),
    "ROTATE_180": lambda x, y, w, h: (w - x, h - y, w, h),
    "ROTATE_270": lambda x, y, w, h: (h - y, x, h, w),
    "TRANSPOSE": lambda x, y, w, h: (y, x, h, w),
    "TRANSVERSE": lambda x, y, w, h: (h - y, w - x, h, w),
}


def map_boxes(target: ExplainTarget, size: tuple[int, int] | None, transpose=None,
              shift: tuple[int, int] | None = None) -> list[list[int]]:
    """`target`'s boxes on the image the model is shown, in whole pixels.

    The file's image is resized to `size` (w, h; None keeps it), then flipped or turned by
    `transpose` (a PIL `Image.Transpose`), then moved by `shift` = (dx, dy) pixels, as training's
    augmentation does. Boxes are clipped to the image; one that leaves it entirely is dropped.
    """
    w, h = size if size is not None else (target.width, target.height)
    sx, sy = w / target.width, h / target.height
    out = []
    for x0, y0, x1, y1 in target.bboxes:
        pts = [(x0 * sx, y0 * sy), (x1 * sx, y1 * sy)]
        ww, hh = w, h
        if transpose is not None:
            fn = _POINT_MAPS[transpose.name]
            mapped = [fn(x, y, w, h) for x, y in pts]
            pts = [(x, y) for x, y, _, _ in mapped]
            ww, hh = mapped[0][2], mapped[0][3]
        if shift is not None:
            pts = [(x + shift[0], y + shift[1]) for x, y in pts]
        (ax, ay), (bx, by) = pts
        bx0, bx1 = sorted((ax, bx))
        by0, by1 = sorted((ay, by))
        bx0, by0 = max(0.0, bx0), max(0.0, by0)
        bx1, by1 = min(float(ww), bx1), min(float(hh), by1)
        if bx1 <= bx0 or by1 <= by0:
            continue
        ix0, iy0 = int(math.floor(bx0 + 1e-6)), int(math.floor(by0 + 1e-6))
        out.append([ix0, iy0, max(ix0 + 1, int(math.ceil(bx1 - 1e-6))), max(iy0 + 1, int(math.ceil(by1 - 1e-6)))])
    return out


def explanation_text(bboxes: list[list[int]], desc: str) -> str:
    """The answer an explanation should be: one JSON object in the instruction's own layout."""
    return json.dumps({"bboxes": bboxes, "desc": desc})
