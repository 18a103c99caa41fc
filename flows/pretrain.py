"""Flow `pretrain`: the embedded stand-in models, trained on a world the evaluation never shows.

The published models the pipeline stands for are pretrained; random-weight stand-ins score at
chance and must learn everything from the evaluation's own categories. This flow trains the
stand-ins once, on the pretraining world (`pretrain.world`: categories and defect kinds that
the embedded evaluation does not use, its own generator seed), with the same cached stages the
pipeline runs:

    synthesize the world -> scan -> SFT split -> tiny Qwen2.5-VL and tiny LLaVA, random
    -> each trained, every weight -> the edge classifier trained from its model definition
    -> exported: <out>/{qwen,llava,edge}/ (safetensors, configs, tokenizers) and provenance.json

`provenance.json` records the command, the world's configuration, the recipes, the code
version, each model's metrics on the world's validation split and every exported file's
size and SHA-256, so a shipped file can be checked against the record of how it was made.
"""
from __future__ import annotations

import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

from saec.artifacts.hashing import sha256_file
from saec.artifacts.store import write_json_atomic
from saec.config import PipelineConfig
from saec.flows.common import call_stage, end_run, start_run
from saec.tasks.cloud.task import model_of, tiny_llava_task, tiny_vlm_task, train_cloud
from saec.tasks.data import fingerprint, scan_mvtec
from saec.tasks.edge.task import train_edge_task
from saec.tasks.sft import sft_task
from saec.tasks.synth import synth_task

PROVENANCE = "provenance.json"
EXPORTED = {"qwen": "tiny Qwen2.5-VL", "llava": "tiny LLaVA-1.5", "edge": "YOLO11n-cls, two classes"}


def _copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def _files(folder: Path) -> dict[str, dict]:
    """Every file of the exported models (the folders of EXPORTED; nothing else under `folder`)."""
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for name in EXPORTED for p in sorted((folder / name).rglob("*")) if p.is_file()}  # fmt: skip


def export_pretrained(out: Path, trained: dict, cfg: PipelineConfig, run_id: str, code_version: str,
                      command: str | None = None) -> dict:
    """Copy the trained models into `out` and write their provenance; returns the provenance record."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("qwen", "llava"):
        _copy_tree(Path(trained[name].dir) / "model", out / name)
        (out / name / "README.md").write_text(  # the random model's card would say it knows nothing
            f"# SAEC pretrained stand-in: {EXPORTED[name]}\n\nEvery weight trained from random on the pretraining "
            "world (categories and defect kinds the embedded evaluation never shows). How it was made, its "
            "metrics and every file's hash: `../provenance.json`.\n")
    edge = out / "edge"
    if edge.exists():
        shutil.rmtree(edge)
    edge.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy2(Path(trained["edge"].dir) / name, edge / name)
    metrics = {name: trained[name].info.get("val") for name in ("qwen", "llava")}
    metrics["edge"] = {"val_top1": trained["edge"].info.get("val_top1")}
    record = {
        "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or (" ".join(["saec", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("saec", "__main__.py")
                               else None),
        "run_id": run_id,
        "code_version": code_version,
        "world": cfg.pretrain.world.model_dump(mode="json"),
        "recipes": {"qwen": trained["qwen"].info.get("config"), "llava": trained["llava"].info.get("config"),
                    "edge": cfg.pretrain.edge_config().train.model_dump(mode="json")},
        "models": EXPORTED,
        "metrics_on_world_val": metrics,
        "files": _files(out),
    }
    write_json_atomic(out / PROVENANCE, record)
    return record


def verify_pretrained(folder: Path) -> list[str]:
    """What differs between the files in `folder` and its provenance record (empty: they match)."""
    import json

    record = json.loads((folder / PROVENANCE).read_text())
    have = _files(folder)
    problems = [f"{name}: not in the record" for name in sorted(set(have) - set(record["files"]))]
    problems += [f"{name}: missing" for name in sorted(set(record["files"]) - set(have))]
    problems += [f"{name}: its content differs from the record" for name in sorted(set(have) & set(record["files"]))
                 if have[name]["sha256"] != record["files"][name]["sha256"]]
    return problems


@flow(name="pretrain", log_prints=True)
def pretrain_flow(cfg: PipelineConfig, out: Path) -> dict:
    """Train the stand-ins on the pretraining world and export them with their provenance to `out`."""
    from saec.artifacts.code import project_code_version

    run = start_run(cfg, "pretrain")
    store = str(cfg.store.root)
    pre = cfg.pretrain
    try:
        world = call_stage(run, synth_task, store=store, cfg=pre.world)
        scan = call_stage(run, scan_mvtec, store=store, source=fingerprint(Path(world.dir) / "mvtec_ad", "mvtec_ad"),
                          cfg=cfg.scan)
        sft = call_stage(run, sft_task, store=store, scan=scan, cfg=cfg.sft)
        qwen = model_of(call_stage(run, tiny_vlm_task, store=store, cfg=pre.tiny))
        llava = model_of(call_stage(run, tiny_llava_task, store=store, seed=pre.tiny.seed))
        trained = {
            "qwen": call_stage(run, train_cloud, name="train_qwen", store=store, sft=sft, base=qwen,
                               cfg=pre.recipe(qwen.path, "qwen")),
            "llava": call_stage(run, train_cloud, name="train_llava", store=store, sft=sft, base=llava,
                                cfg=pre.recipe(llava.path, "llava")),
            "edge": call_stage(run, train_edge_task, store=store, sft=sft, cfg=pre.edge_config()),
        }
        record = export_pretrained(Path(out), trained, cfg, run.run_id, project_code_version())
    except BaseException as exc:
        end_run(run, exc)
        raise
    run.finish("completed", exported=str(Path(out).resolve()))
    return {"run": run, "provenance": record, "out": Path(out)}
