"""Flow `pipeline`: prepare -> train the edge and cloud models -> evaluate every system -> report."""
from __future__ import annotations

from prefect import flow

from saec.artifacts.store import Store
from saec.config import PipelineConfig
from saec.flows.common import call_stage, end_run, run_name, start_run
from saec.flows.evaluate import Models, evaluate_flow, publish_summary
from saec.flows.prepare import prepare_stages
from saec.standins import standin
from saec.tasks.cloud.task import adapter_ref, model_ref, train_cloud
from saec.tasks.edge.task import train_edge_task

EVAL_SETS = {"mvtec_holdout": "holdout", "ksdd2_1to1": "ksdd2_1to1"}


def build_models(cfg: PipelineConfig, run, sft) -> Models:
    """The edge and cloud models: the user's or the embedded stand-ins, fine-tuned here (cached like every stage)."""
    store = str(cfg.store.root)
    edge = None
    if cfg.edge.mode == "supervised":
        edge = call_stage(run, train_edge_task, store=store, sft=sft, cfg=cfg.edge)
    vlm = model_ref(standin("qwen") if cfg.cloud.embedded else cfg.cloud.model)
    if cfg.cloud.adapter is not None:
        adapter = adapter_ref(path=cfg.cloud.adapter)
    else:
        trained = call_stage(run, train_cloud, store=store, sft=sft, base=vlm, cfg=cfg.cloud.train_config(vlm.path))
        adapter = adapter_ref(trained)
    llava = None
    if "llava_zeroshot" in cfg.evaluate.systems:
        llava = model_ref(cfg.cloud.llava_model or standin("llava"), kind="llava")
    return Models(edge=edge, vlm=vlm, adapter=adapter, llava=llava)


@flow(name="pipeline", flow_run_name=run_name("pipeline"), log_prints=True)
def pipeline_flow(cfg: PipelineConfig) -> dict:
    """The whole SAEC pipeline; returns the report stage of each evaluation set."""
    run = start_run(cfg, "pipeline")
    try:
        prepared = prepare_stages(cfg, run)
        if "sft" not in prepared:
            raise ValueError("the pipeline trains on MVTec AD's SFT split: set data.mvtec_root (or use the embedded data)")
        run.save()
        models = build_models(cfg, run, prepared["sft"])
        reports = {}
        for name in cfg.evaluate.datasets:
            if EVAL_SETS[name] in prepared:
                run.save()
                reports[name] = evaluate_flow(cfg, run.run_id, name, prepared[EVAL_SETS[name]], prepared["sft"], models)
                run.record = Store(cfg.store.root).open_run(run.run_id).record  # the subflow added its stages
    except BaseException as exc:
        end_run(run, exc)
        raise
    run.finish("completed", reports={k: v.dir for k, v in reports.items()})
    publish_summary(cfg, run, reports)
    return {"run": run, "reports": reports, **prepared}
