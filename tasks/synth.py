"""The embedded default's data: synthetic MVTec AD and KolektorSDD2 folders, made by a cached task."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from saec.artifacts.store import StageResult, write_json_atomic
from saec.datasets.synthetic import SyntheticConfig, generate_all
from saec.tasks.stage import STAGE_TASK, run_stage, stage_cache_key

MODULES = ["saec.datasets.synthetic"]


@task(name="synthesize-data", cache_key_fn=stage_cache_key("synthetic", MODULES), **STAGE_TASK)
def synth_task(store: str, cfg: SyntheticConfig) -> StageResult:
    """Write seeded synthetic datasets in the exact MVTec AD and KolektorSDD2 layouts."""

    def build(out: Path):
        counts = generate_all(out, cfg)
        summary = write_json_atomic(out / "synthetic.json", {"config": cfg, "counts": counts})
        return {"summary": summary}, {"counts": counts, "mvtec_root": "mvtec_ad", "ksdd2_root": "ksdd2"}

    return run_stage(store, "synthetic", MODULES, dict(cfg=cfg), build)
