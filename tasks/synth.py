"""The embedded default's data: synthetic MVTec AD and KolektorSDD2 folders, made by a cached stage."""
from __future__ import annotations

from pathlib import Path

from saec.artifacts.store import write_json_atomic
from saec.datasets.synthetic import SyntheticConfig, generate_all
from saec.tasks.stage import Built, stage


@stage("synthetic", task="synthesize-data")
def synth_task(out: Path, cfg: SyntheticConfig) -> Built:
    """Write seeded synthetic datasets in the exact MVTec AD and KolektorSDD2 layouts."""
    counts = generate_all(out, cfg)
    summary = write_json_atomic(out / "synthetic.json", {"config": cfg, "counts": counts})
    files = {"summary": summary, "mvtec_ad": out / "mvtec_ad", "ksdd2": out / "ksdd2"}
    return files, {"counts": counts, "mvtec_root": "mvtec_ad", "ksdd2_root": "ksdd2"}
