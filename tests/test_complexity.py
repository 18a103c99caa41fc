"""The published run's scene complexity: each component against an independent numpy computation."""
from __future__ import annotations

import io
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from saec.artifacts.store import read_table
from saec.datasets.images import BadImage
from saec.tasks.complexity import ComplexityConfig, complexity_scores, write_complexity

S = 192
CFG = ComplexityConfig(progress=False)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _conv3(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """3x3 correlation with OpenCV's default border (reflect-101 == numpy 'reflect')."""
    p = np.pad(img.astype(np.float64), 1, mode="reflect")
    h, w = img.shape
    return sum(k[i, j] * p[i : i + h, j : j + w] for i in range(3) for j in range(3))


def _reference(grey: np.ndarray) -> dict[str, float]:
    """Straightforward computation of H, L, G, R and C; E comes from the known-answer tests."""
    counts, _ = np.histogram(grey, bins=256, range=(0, 256))
    p = counts / counts.sum()
    p = p[p > 0]
    h = -(p * np.log(p)).sum() / math.log(256)
    lap = _conv3(grey, np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]])).var()
    sx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    g = np.hypot(_conv3(grey, sx), _conv3(grey, sx.T)).mean()
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", quality=30)
    rec = np.asarray(Image.open(buf).convert("L"))
    r = np.abs(grey.astype(float) - rec.astype(float)).mean()
    return {"H": h, "L": lap, "G": g, "R": r}


def _images(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:S, 0:S]
    step = np.where(xx < S // 2, 40, 200).astype(np.uint8)
    return {
        "flat": _save(tmp_path / "flat.png", np.full((S, S), 128, np.uint8)),
        "ramp": _save(tmp_path / "ramp.png", (xx * 255 // (S - 1)).astype(np.uint8)),
        "step": _save(tmp_path / "step.png", step),
        "noise": _save(tmp_path / "noise.png", rng.integers(0, 256, (S, S), dtype=np.uint8)),
        "texture": _save(
            tmp_path / "texture.png",
            np.clip(128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 8, (S, S)), 0, 255).astype(np.uint8),
        ),
    }


def test_components_match_independent_computation(tmp_path):
    files = _images(tmp_path)
    df = complexity_scores(list(files.values()), CFG).set_index("path")
    for name, path in files.items():
        row = df.loc[str(path)]
        ref = _reference(np.asarray(Image.open(path)))
        assert row.H == pytest.approx(ref["H"], abs=1e-12), name
        assert row.L == pytest.approx(ref["L"], rel=1e-9, abs=1e-9), name
        assert row.G == pytest.approx(ref["G"], rel=1e-9, abs=1e-9), name
        assert row.R == pytest.approx(ref["R"], abs=0.05), name  # PIL's and OpenCV's libjpeg may round apart
        expected = (
            0.30 * row.H + 0.25 * row.E + 0.20 * math.log1p(row.L) / 8 + 0.15 * row.G / 16 + 0.10 * row.R / 255
        )
        assert row.complexity == pytest.approx(expected, rel=1e-12), name
        assert row.cpx_size == S


def test_edge_term_is_the_mean_of_a_0_255_map(tmp_path):
    files = _images(tmp_path)
    df = complexity_scores([files["flat"], files["step"], files["noise"]], CFG)
    flat, step, noise = df.E
    assert flat == 0.0
    # a vertical step gives one Canny edge pixel per row: 192 pixels of 255 over 192*192
    assert step == pytest.approx(255.0 * S / (S * S))
    # E is not rescaled to [0, 1]: noise has far more than 1/255 of its pixels on edges
    assert 1.0 < noise <= 255.0
    grey = np.asarray(Image.open(files["noise"]))
    assert noise == pytest.approx(255.0 * np.count_nonzero(cv2.Canny(grey, 64, 128)) / grey.size)


def test_invariants_flat_low_noise_high(tmp_path):
    files = _images(tmp_path)
    df = complexity_scores(list(files.values()), CFG).set_index(pd.Index(list(files)))
    flat = df.loc["flat"]
    assert flat.H == 0.0 and flat.E == 0.0 and flat.L == 0.0 and flat.G == 0.0
    assert flat.complexity < 0.01
    assert df.complexity.idxmax() == "noise"
    c = df.complexity
    assert c["flat"] < c["ramp"] < c["texture"] < c["noise"]
    assert df.loc["noise"].H > 0.99


def test_resize_colour_and_table(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    path = _save(tmp_path / "big.png", rgb)
    grey = cv2.resize(cv2.cvtColor(rgb[..., ::-1].copy(), cv2.COLOR_BGR2GRAY), (S, S), interpolation=cv2.INTER_LINEAR)
    manifest = pd.DataFrame({"image_id": ["abc"], "path": [str(path)], "label": [0]})
    ref, info = write_complexity(manifest, tmp_path / "cpx.parquet", CFG)
    out = read_table(ref.path)
    assert list(out.columns) == ["image_id", "path", "source_path", "complexity", "H", "E", "L", "G", "R", "cpx_size"]
    assert out.image_id.tolist() == ["abc"] and ref.schema_name == "complexity"
    assert out.source_path.isna().all()  # the manifest names no source file
    with_source = manifest.assign(source_path="/data/carpet/test/good/000.jpg")
    assert read_table(write_complexity(with_source, tmp_path / "s.parquet", CFG)[0].path).source_path.tolist() == [
        "/data/carpet/test/good/000.jpg"]
    assert out.H.iloc[0] == pytest.approx(_reference(grey)["H"], abs=1e-12)
    assert out.L.iloc[0] == pytest.approx(_reference(grey)["L"], rel=1e-9)
    assert info["n_images"] == 1


def test_unreadable_image_raises_naming_the_file(tmp_path):
    files = _images(tmp_path)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(BadImage, match="broken.png"):
        complexity_scores([files["flat"], bad, files["noise"]], CFG)
    with pytest.raises(BadImage, match="missing.png"):
        complexity_scores([tmp_path / "missing.png"], CFG)


def test_ids_from_bytes_when_only_paths_given(tmp_path):
    files = _images(tmp_path)
    df = complexity_scores([files["flat"]], CFG)
    import hashlib

    assert df.image_id.iloc[0] == hashlib.sha256(files["flat"].read_bytes()).hexdigest()
