"""Flow `prepare`: source folders -> validated scans -> SFT files -> evaluation sets."""
from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from saec.artifacts.store import RunFolder, StageResult
from saec.config import PipelineConfig
from saec.flows.common import call_stage, end_run, run_name, start_run
from saec.tasks.data import fingerprint, holdout_task, ksdd2_task, leakage_task, scan_ksdd2, scan_mvtec
from saec.tasks.sft import sft_task
from saec.tasks.synth import synth_task


def source_roots(cfg: PipelineConfig, run: RunFolder) -> tuple[Path | None, Path | None]:
    """The MVTec AD and KolektorSDD2 folders this run reads: the user's, or freshly synthesized ones."""
    if cfg.data.source == "folders":
        return cfg.data.mvtec_root, cfg.data.ksdd2_root
    synth = call_stage(run, synth_task, store=str(cfg.store.root), cfg=cfg.data.synthetic)
    return Path(synth.dir) / "mvtec_ad", Path(synth.dir) / "ksdd2"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger (its records reach the terminal and the run's log in the UI);
    outside a flow run, the module's logger."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def warn_shortfall(name: str, built: StageResult) -> None:
    """Warn as soon as an evaluation set is known to hold fewer goods or defects than asked for,
    whether it was built now or taken from the store; the command's summary repeats it at the end."""
    shortfall = built.info.get("shortfall")
    if shortfall:
        run_logger().warning("%s is smaller than asked: %s", name, shortfall)


def prepare_stages(cfg: PipelineConfig, run: RunFolder) -> dict:
    """Run (or take from cache) every preparation stage; stop on leakage."""
    store = str(cfg.store.root)
    out: dict = {}
    mvtec_root, ksdd2_root = source_roots(cfg, run)
    if mvtec_root is not None:
        scan = call_stage(run, scan_mvtec, store=store, source=fingerprint(mvtec_root, "mvtec_ad"), cfg=cfg.scan)
        sft = call_stage(run, sft_task, store=store, scan=scan, cfg=cfg.sft)
        holdout = call_stage(run, holdout_task, store=store, scan=scan, sft=sft, cfg=cfg.holdout)
        warn_shortfall("holdout", holdout)
        run.record["checks"] = {"leakage": leakage_task(holdout, sft)}
        out.update(scan_mvtec=scan, sft=sft, holdout=holdout)
    if ksdd2_root is not None:
        kscan = call_stage(run, scan_ksdd2, store=store, source=fingerprint(ksdd2_root, "ksdd2"), cfg=cfg.scan)
        ksdd2 = call_stage(run, ksdd2_task, store=store, scan=kscan, cfg=cfg.ksdd2)
        warn_shortfall("ksdd2_1to1", ksdd2)
        out.update(scan_ksdd2=kscan, ksdd2_1to1=ksdd2)
    return out


@flow(name="prepare", flow_run_name=run_name("prepare"), log_prints=True)
def prepare_flow(cfg: PipelineConfig) -> dict:
    """Build the SFT split, the MVTec AD holdout and the KolektorSDD2 1:1 set, and check leakage."""
    run = start_run(cfg, "prepare")
    try:
        out = prepare_stages(cfg, run)
    except BaseException as exc:
        end_run(run, exc)
        raise
    run.finish("completed")
    return out | {"run": run}
