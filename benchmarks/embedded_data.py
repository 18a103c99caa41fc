"""The embedded default's SFT training split, drawn into a work folder as the pipeline draws it
(for the benchmarks that train on it)."""
from __future__ import annotations

from pathlib import Path


def embedded_sft(work: Path, threads: int) -> Path:
    """Write the embedded synthetic draw under `work` and return its SFT training JSONL."""
    from saec.config import EMBEDDED_SYNTHETIC
    from saec.datasets.mvtec import read_mvtec
    from saec.datasets.synthetic import SyntheticConfig, generate_all
    from saec.tasks.sft import SFTConfig, split_sft, write_jsonl

    generate_all(work / "synthetic", SyntheticConfig(**EMBEDDED_SYNTHETIC), workers=threads)
    train, _ = split_sft(read_mvtec(work / "synthetic" / "mvtec_ad").images, SFTConfig())
    return write_jsonl(train, work / "sft_train.jsonl")
