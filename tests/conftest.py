"""Shared fixtures: offline settings, one Prefect test server per session, small image trees."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="saec-tests-"))
os.environ.setdefault("SAEC_HOME", str(_SESSION_TMP / "home"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect-home"))

from saec.env import configure_offline  # noqa: E402

configure_offline()

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str):
    """A module of benchmarks/ (helpers the benchmarks and these tests share), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"saec_benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The published Hugging Face folders Qwen2.5-VL-7B-Instruct and llava-1.5-7b-hf (configs, tokenizers,
# processors and chat templates; no weights needed) for the contract and numerics tests: SAEC_MODELS_DIR
# names the folder that holds them. Unset, those tests skip and say so.
MODELS = Path(os.environ.get("SAEC_MODELS_DIR") or "/SAEC_MODELS_DIR-is-unset").expanduser()
MODELS_SKIP = ("needs the published model folders: set SAEC_MODELS_DIR to a folder holding Qwen2.5-VL-7B-Instruct "
               "and llava-1.5-7b-hf (configs, tokenizers, processors; no weights needed)")

# A pipeline small enough for a test: two categories, a few images, one epoch, two cloud steps.
SMALL_PIPELINE = [
    "data.synthetic.categories=[carpet, capsule]",
    "data.synthetic.n_train_good=8",
    "data.synthetic.n_test_good=6",
    "data.synthetic.n_test_defect_per_type=2",
    "data.synthetic.ksdd2_n_train=12",
    "data.synthetic.ksdd2_n_test=8",
    "edge.train.epochs=1",
    "cloud.train.max_steps=2",
    "cloud.train.epochs=1",
    "evaluate.datasets=[mvtec_holdout]",
]


@pytest.fixture(scope="module")
def two_torch_threads():
    """Model tests run with two intra-op threads, as on a 2-core machine, whatever the host."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server (temporary database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def save(path: Path, arr: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path, **kw)
    return path


def noise(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def make_mvtec(root: Path, categories=("alpha", "beta"), n_train=4, n_good=3, defects=("scratch", "hole"), n_def=2) -> Path:
    """A small MVTec AD tree of distinct noise images (RGB for the first category, grey for the rest)."""
    seed = 0
    for ci, cat in enumerate(categories):
        shape = (32, 32, 3) if ci == 0 else (32, 32)
        for i in range(n_train):
            seed += 1
            save(root / cat / "train" / "good" / f"{i:03d}.png", noise(shape, seed))
        for i in range(n_good):
            seed += 1
            save(root / cat / "test" / "good" / f"{i:03d}.png", noise(shape, seed))
        for d in defects:
            for i in range(n_def):
                seed += 1
                save(root / cat / "test" / d / f"{i:03d}.png", noise(shape, seed))
                mask = np.zeros((32, 32), np.uint8)
                mask[4:9, 4:9] = 255
                save(root / cat / "ground_truth" / d / f"{i:03d}_mask.png", mask)
    return root


def make_ksdd2(root: Path, n_train=6, n_test=4, defect_every=3) -> Path:
    seed = 1000
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            seed += 1
            stem = f"{10000 + seed:05d}"
            save(root / split / f"{stem}.png", noise((40, 16, 3), seed))
            mask = np.zeros((40, 16), np.uint8)
            if i % defect_every == 0:
                mask[10:14, 5:8] = 255
            save(root / split / f"{stem}_GT.png", mask)
    return root


@pytest.fixture
def mvtec_tree(tmp_path) -> Path:
    return make_mvtec(tmp_path / "mvtec")


@pytest.fixture
def ksdd2_tree(tmp_path) -> Path:
    return make_ksdd2(tmp_path / "ksdd2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The embedded default cloud model folder (tiny Qwen2.5-VL, random weights)."""
    from saec.tasks.cloud.config import TinyModelConfig
    from saec.tasks.cloud.tiny import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("models") / "tiny", TinyModelConfig())
