"""Flow `evaluate`: SAEC and its baselines on one evaluation set, each measured.

SAEC runs as the design describes it: complexity -> complexity quota -> the cloud starts
on the quota images *while* the edge classifies the rest -> the images the edge is unsure
of follow to the cloud -> merge. Its wall time is measured around that section, with the
serial sum of the same stages' measured times beside it. Each baseline runs alone and is
measured inside its own stage.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from saec.artifacts.hashing import hash_obj
from saec.artifacts.store import RunFolder, StageResult, Store, write_json_atomic, write_table
from saec.config import PipelineConfig
from saec.flows.common import cached_result, call_stage, collect, runs_here, submit_stage
from saec.standins import standin
from saec.tasks.cloud.task import preload_scorer, release_models, score_cloud
from saec.tasks.edge.task import predict_edge_task
from saec.tasks.evaluate import RULE_FIELDS, complexity_task, merge_task, quota_task, report_task, route_task
from saec.tasks.report import RESOURCES, display_rows, markdown_table
from saec.tasks.stage import ModelRef
from saec.tasks.telemetry import Sampler, summarize


@dataclass
class Models:
    """What the systems run: references only."""

    edge: StageResult | None  # trained edge weights (supervised mode), None for the ImageNet rule
    vlm: ModelRef
    adapter: ModelRef | None
    llava: ModelRef | None


def _saec(cfg: PipelineConfig, run: RunFolder, name: str, images: StageResult, sft: StageResult, m: Models) -> dict:
    store, tel = str(cfg.store.root), cfg.telemetry
    score_cfg = cfg.score_config(m.vlm.path)
    rule = cfg.routing.model_dump(include=RULE_FIELDS)
    p_cpx = dict(store=store, images=images, table="manifest", cfg=cfg.complexity, telemetry=tel)

    def p_quota(cpx: StageResult) -> dict:
        return dict(store=store, images=images, table="manifest", complexity=cpx, ratio=cfg.routing.init_q_ratio)

    def p_first(quota: StageResult) -> dict:
        return dict(store=store, images=quota, table="cloud_manifest", model=m.vlm, adapter=m.adapter, cfg=score_cfg,
                    telemetry=tel, label=f"{name}/saec_cloud_quota")  # fmt: skip

    sampler = Sampler(tel).start()
    t0 = time.perf_counter()
    # the cloud model loads while the complexity scores are computed, where the cloud will run here
    preload = _preload_cloud(p_cpx, p_quota, p_first, score_cfg, m)
    cpx = collect(run, complexity_task.submit(**p_cpx), f"{name}/complexity", complexity_task, **p_cpx)
    quota = collect(run, quota_task.submit(**p_quota(cpx)), f"{name}/quota", quota_task, **p_quota(cpx))
    # the cloud starts on the quota images at once; the edge classifies the rest meanwhile
    p_first = p_first(quota)
    f_first = submit_stage(score_cloud, **p_first)
    p_edge = dict(store=store, images=quota, table="edge_manifest", trained=m.edge, sft=sft, cfg=cfg.edge,
                  telemetry=tel, label=f"{name}/saec_edge")  # fmt: skip
    edge = collect(run, submit_stage(predict_edge_task, **p_edge), f"{name}/saec_edge", predict_edge_task, **p_edge)
    p_route = dict(store=store, images=images, table="manifest", quota=quota, edge=edge, rule=rule)
    routing = collect(run, route_task.submit(**p_route), f"{name}/routing", route_task, **p_route)
    p_second = p_first | dict(images=routing, table="cloud_manifest", label=f"{name}/saec_cloud_unsure")
    f_second = submit_stage(score_cloud, **p_second, wait_for=[f_first])  # one GPU: after the first cloud batch
    first = collect(run, f_first, f"{name}/saec_cloud_quota", score_cloud, **p_first)
    second = collect(run, f_second, f"{name}/saec_cloud_unsure", score_cloud, **p_second)
    p_merge = dict(store=store, images=images, table="manifest", routing=routing, edge=edge, cloud_first=first,
                   cloud_second=second, cloud_thr=cfg.routing.cloud_thr)  # fmt: skip
    merged = call_stage(run, merge_task, name=f"{name}/merge", **p_merge)
    wall = time.perf_counter() - t0
    samples = sampler.stop()

    parts = {"complexity": cpx, "edge": edge, "cloud_quota": first, "cloud_unsure": second}
    ran = [k for k in parts if run.record["stages"][f"{name}/{_stage_name(k)}"]["state"] == "ran"]
    measurement = {
        "wall_s": wall,
        "serial_s": sum(float(p.info.get("seconds", 0.0)) for p in parts.values()),
        "stage_seconds": {k: p.info.get("seconds", 0.0) for k, p in parts.items()},
        "telemetry": summarize(samples, sampler.sources),
        "run_id": run.run_id,
        "cloud_preloaded": preload is not None,
    }
    return {"merged": merged, "measurement": _measurement_record(store, parts, ran, measurement, samples)}


def _preload_cloud(p_cpx: dict, p_quota, p_first, score_cfg, m: Models):
    """Start loading SAEC's cloud model in the background, unless its first cloud stage runs
    elsewhere (a work pool) or is stored already (so a cached re-run loads nothing)."""
    if not runs_here(score_cloud):
        return None
    cpx = cached_result(complexity_task, p_cpx)
    quota = cached_result(quota_task, p_quota(cpx)) if cpx is not None else None
    if quota is not None and cached_result(score_cloud, p_first(quota)) is not None:
        return None
    return preload_scorer(score_cfg, m.vlm, m.adapter)


def _stage_name(part: str) -> str:
    return {"complexity": "complexity", "edge": "saec_edge", "cloud_quota": "saec_cloud_quota",
            "cloud_unsure": "saec_cloud_unsure"}[part]  # fmt: skip


def _measurement_record(store: str, parts: dict, ran: list[str], fresh: dict, samples) -> dict:
    """SAEC's cost is what a run measured while all its stages executed.

    All stages executed now: this run's measurement is stored under the stages' identity.
    None did: the stored measurement of the run that executed them is reported (it names
    that run). Some did, or none did and no run stored a measurement: the wall time would
    mix executed and stored work, so none is reported, and the reason is given.
    """
    st = Store(store)
    key = hash_obj({k: p.digest() for k, p in parts.items()})[:24]
    if len(ran) == len(parts):
        fresh["measured"] = "executed"

        def build(out):
            write_table(samples, "telemetry", out / "telemetry.parquet")
            return {"measurement": write_json_atomic(out / "measurement.json", fresh),
                    "telemetry": out / "telemetry.parquet"}, fresh  # fmt: skip

        return st.get_or_build("saec_measure", key, build, measurements=("telemetry",), replace=True)[0].info
    stored = st.lookup("saec_measure", key)
    if not ran and stored is not None:
        return stored.info  # says "executed" and names the run that measured it
    why = (f"not measured: only {', '.join(ran)} executed in this run" if ran
           else "not measured: every stage came from the store and no run that executed them stored a measurement")
    return fresh | {"wall_s": None, "telemetry": {}, "measured": why}


def _baseline(cfg, run, name, system, images, sft, m: Models) -> tuple[StageResult, dict]:
    store, tel = str(cfg.store.root), cfg.telemetry
    common = dict(store=store, images=images, table="manifest", telemetry=tel, label=f"{name}/{system}")
    if system == "edge_only":
        res = call_stage(run, predict_edge_task, name=f"{name}/{system}", trained=m.edge, sft=sft, cfg=cfg.edge, **common)
    elif system == "cloud_only":
        score_cfg = cfg.score_config(m.vlm.path)
        res = call_stage(run, score_cloud, name=f"{name}/{system}", model=m.vlm, adapter=m.adapter, cfg=score_cfg, **common)
    else:
        model = m.vlm if system == "qwen_zeroshot" else m.llava
        score_cfg = cfg.score_config(model.path, baseline=True)
        res = call_stage(run, score_cloud, name=f"{name}/{system}", model=model, adapter=None, cfg=score_cfg, **common)
    measurement = {"wall_s": res.info.get("seconds"), "serial_s": res.info.get("seconds"),
                   "telemetry": res.info.get("telemetry", {}), "measured": "inside its stage"}  # fmt: skip
    if "shards" in res.info:  # run as shards: the serial cost is their sum, the wall time the longest shard's
        measurement |= {"wall_s": res.info.get("span_s"),
                        "measured": f"inside its {len(res.info['shards'])} shards (wall: the longest)"}  # fmt: skip
    return res, measurement


@flow(name="evaluate", flow_run_name="evaluate {name}", log_prints=True)
def evaluate_flow(cfg: PipelineConfig, run_id: str, name: str, images: StageResult, sft: StageResult, models: Models) -> StageResult:
    """Every configured system on one evaluation set; returns the report stage."""
    store = str(cfg.store.root)
    run = Store(store).open_run(run_id)
    outputs: dict[str, StageResult] = {}
    measurements: dict[str, dict] = {}
    for system in cfg.evaluate.systems:
        release_models()  # every system is measured loading its own models
        if system == "saec":
            out = _saec(cfg, run, name, images, sft, models)
            outputs[system], measurements[system] = out["merged"], out["measurement"]
        else:
            outputs[system], measurements[system] = _baseline(cfg, run, name, system, images, sft, models)
    notes = []
    if cfg.edge.mode == "imagenet_rule" and cfg.routing.keep_bidir:
        notes.append("edge.mode=imagenet_rule: a defect verdict cannot pass the keep test, so keep_bidir has no effect")
    labels = system_labels(cfg)
    if any("stand-in" in labels.get(s, "") for s in cfg.evaluate.systems):
        notes.append(STAND_IN_NOTE)
    report = call_stage(run, report_task, name=f"{name}/report", store=store, dataset=name, images=images,
                        outputs=outputs, measurements=measurements, cloud_thr=cfg.routing.cloud_thr, notes=notes,
                        labels=labels, shortfall=images.info.get("shortfall"))  # fmt: skip
    _publish(cfg, run, name, report)
    return report


def system_labels(cfg: PipelineConfig) -> dict[str, str]:
    """Names for the systems that run embedded stand-ins, so that no report passes them off as the
    published models (short, so that tables fit a browser pane; `STAND_IN_NOTE` says what they are)."""
    labels = {}
    if cfg.cloud.embedded:
        labels["cloud_only"] = "Cloud only (stand-in, tuned)"
        labels["qwen_zeroshot"] = "Qwen zero-shot (stand-in)"
    if cfg.cloud.llava_model is None:
        labels["llava_zeroshot"] = "LLaVA zero-shot (stand-in)"
    supervised = cfg.edge.mode == "supervised"
    if Path(cfg.edge.weights) == standin("edge"):
        labels["edge_only"] = "Edge only (stand-in, tuned)" if supervised else "Edge only (stand-in, untuned)"
    elif cfg.edge.weights.endswith((".yaml", ".yml")):
        labels["edge_only"] = "Edge only (random init, trained)" if supervised else "Edge only (random, untrained)"
    return labels


STAND_IN_NOTE = ("stand-in: an embedded tiny model shipped with SAEC (Qwen2.5-VL and LLaVA-1.5 architectures, a "
                 "YOLO11n-cls edge), pretrained on a synthetic world of other categories; not the published weights")


def artifact_tag(cfg: PipelineConfig) -> str:
    """Eight hex digits of the store and the configuration: artifact keys carry it, so that runs on
    another store or with another configuration do not become this one's "latest"."""
    view = cfg.model_dump(mode="json")
    view["store"] = {"root": cfg.store.location}
    return hash_obj(view)[:8]


def artifact_key(cfg: PipelineConfig, name: str, kind: str) -> str:
    """`<evaluation set>-<kind>-<tag>`, e.g. `mvtec-holdout-metrics-1a2b3c4d`."""
    return f"{name.replace('_', '-').lower()}-{kind}-{artifact_tag(cfg)}"


# the columns of the metrics table artifacts and of `saec run`'s results tables, headed as in the report
ARTIFACT_COLUMNS = ("n_good", "n_defect", "accuracy", "balanced_accuracy", "cloud_share", "wall_s", "serial_s",
                    "energy_per_correct_mwh", "cpu_mem_added_gb")


def results_rows(report: StageResult, explain: bool = True) -> list[dict]:
    """The systems of a report for display: the report's system names, headings, units and rounding.

    `explain` adds why energy is `n/a` and how each system was measured (the artifacts carry
    them; the command line prints the report's notes instead)."""
    info = report.info
    rows = display_rows(info["systems"], ARTIFACT_COLUMNS, info.get("labels"))
    if explain:
        energy = RESOURCES["energy_per_correct_mwh"]
        for row, r in zip(rows, info["systems"]):
            if r.get("energy_per_correct_mwh") is None:
                row[energy] = "n/a (no energy counter readable)"
            row["measured"] = r.get("measured") or ""
    return rows


def _provenance(cfg: PipelineConfig, run: RunFolder) -> str:
    return (f"store {cfg.store.location}, configuration {artifact_tag(cfg)}, "
            f"run {run.run_id}")


def _publish(cfg: PipelineConfig, run: RunFolder, name: str, report: StageResult) -> None:
    """Keyed Prefect artifacts of one evaluation set: its results table (rounded, one unit per column)
    and its markdown report, each saying which store, configuration and run made it."""
    where = _provenance(cfg, run)
    create_table_artifact(key=artifact_key(cfg, name, "metrics"), table=results_rows(report),
                          description=f"SAEC results on {name} ({where})")
    text = report.path("markdown").read_text()
    systems = embedded_figure(report, "figure", f"SAEC and its baselines on {name}")
    breakdown = embedded_figure(report, "breakdown_figure", f"accuracy by category and defect type on {name}")
    head, sep, tail = text.partition("\n## Accuracy by category")  # the figure beside the tables it draws
    md = (head.rstrip() + "\n\n" + systems + "\n" + sep + tail).rstrip() + "\n\n" + breakdown
    md += f"\n\nRun folder: `{run.path}`; report folder: `{report.dir}`\n"
    create_markdown_artifact(key=artifact_key(cfg, name, "report"), markdown=md,
                             description=f"SAEC report on {name} ({where})")


# Figures go into the UI inside the markdown, as data URIs: the UI runs in a browser that cannot
# read the worker's disk, and Prefect's markdown renderer shows such images.
MAX_EMBEDDED_BYTES = 4 * 2**20


def embedded_figure(report: StageResult, output: str, alt: str) -> str:
    """Markdown showing one of the report's PNG figures inline, with its path beneath; the path
    alone where the figure is missing or too large to embed."""
    try:
        path = Path(report.path(output))
        data = path.read_bytes()
    except (KeyError, OSError):
        return f"(no {output.replace('_', ' ')} in this report)"
    if len(data) > MAX_EMBEDDED_BYTES:
        return f"Figure ({len(data) / 2**20:.1f} MB, too large to show here): `{path}`"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})\n\nFigure file: `{path}`"


def publish_summary(cfg: PipelineConfig, run: RunFolder, reports: dict[str, StageResult]) -> None:
    """One markdown artifact on the calling flow run: every evaluation set's results, and where
    each set's report lies."""
    if not reports:
        return
    parts = [f"# SAEC results\n\n{_provenance(cfg, run)}\n"]
    for name, report in reports.items():
        rows = results_rows(report)
        head = [k for k in rows[0] if k not in (RESOURCES["energy_per_correct_mwh"], RESOURCES["cpu_mem_added_gb"], "measured")]
        table = markdown_table(head, [[str(r[k]) for k in head] for r in rows])
        parts.append(f"## {name}\n\n" + "\n".join(table) + "\n\n" + embedded_figure(report, "figure", name)
                     + f"\n\nReport: `{report.path('markdown')}` (artifact `{artifact_key(cfg, name, 'report')}`)\n")
    create_markdown_artifact(key=f"summary-{artifact_tag(cfg)}", markdown="\n".join(parts),
                             description=f"SAEC results of every evaluation set ({_provenance(cfg, run)})")
