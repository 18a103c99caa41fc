"""Flow `reevaluate`: the current data through the current models, compared with the previous run.

The models are those of a completed `pipeline` run (the latest, or the one named): its
trained edge classifier, its cloud adapter and the SFT split they learned from. Nothing is
trained here: a training stage that the cache cannot serve stops the run with a message.
The data is prepared afresh (cached when unchanged), checked for leakage against the
models' SFT split, and evaluated with every configured system.

Each evaluation set's metrics are then compared with the previous completed re-evaluation
of the same deployment (`saec.tasks.drift`); the comparison is written next to the run
record (`runs/<run>/drift-<dataset>.parquet`) and published as the keyed Prefect artifact
`drift-<dataset>`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, flow
from prefect.artifacts import create_markdown_artifact

from saec.env import configure_offline

configure_offline()

from saec.artifacts.store import RunFolder, StageResult, Store, write_table  # noqa: E402
from saec.config import PipelineConfig  # noqa: E402
from saec.flows.common import end_run, placed, run_name, start_run  # noqa: E402
from saec.flows.evaluate import evaluate_flow  # noqa: E402
from saec.flows.pipeline import EVAL_SETS, build_models  # noqa: E402
from saec.flows.prepare import prepare_stages  # noqa: E402
from saec.flows.remote import RemoteConfig, entry_config, run_summary, stage_placement  # noqa: E402
from saec.tasks.cloud.task import tiny_llava_task, tiny_vlm_task, train_cloud  # noqa: E402
from saec.tasks.data import leakage_task  # noqa: E402
from saec.tasks.drift import DriftConfig, compare_metrics, drift_findings, drift_markdown  # noqa: E402
from saec.tasks.edge.task import train_edge_task  # noqa: E402
from saec.tasks.stage import stage_of  # noqa: E402
from saec.errors import ActionableError  # noqa: E402

MODEL_TASKS: tuple[Task, ...] = (train_edge_task, tiny_vlm_task, train_cloud, tiny_llava_task)


class ModelsNotTrained(ActionableError, RuntimeError):
    """A re-evaluation needs a model that the source pipeline run did not use."""


class DriftDetected(RuntimeError):
    """Raised after publishing, when `drift.fail_on_drift` is set and a metric moved beyond tolerance."""


class SourceRunModels:
    """Stage placement for a re-evaluation: the model stages are those the source pipeline run used.

    They are found from the run's record, not from cache keys computed now, so an edit to the
    training code since then does not stop the re-evaluation; each is verified against the
    content hashes the record holds. Nothing is trained.
    """

    def __init__(self, source: RunFolder):
        self.source = source
        self.names = {t.name for t in MODEL_TASKS}

    def owns(self, task: Task) -> bool:
        return task.name in self.names

    def run(self, task: Task, params: dict[str, Any]) -> tuple[StageResult, bool]:
        name = stage_of(task).name
        entry = self.source.record["stages"].get(name)
        if entry is None:
            raise ModelsNotTrained(
                f"pipeline run {self.source.run_id} used no {task.name!r} output, and a re-evaluation never trains: "
                "evaluate with the configuration that run had (edge.mode, cloud.model, cloud.adapter), or run the "
                "pipeline with this one first"
            )
        return _stage_of(entry, self.source), True

    def submit(self, task: Task, params: dict[str, Any], wait_for: list | None):
        raise NotImplementedError("model stages are called, not submitted")


def _stage_of(entry: dict, source: RunFolder) -> StageResult:
    """The stage output a run record names, re-read from its folder and checked against the record's hashes.
    In an object store the folder is the machine's that ran `source`: the output is found by stage and key."""
    folder = Path(entry["dir"])
    store = Store(source.remote.url) if source.remote is not None else Store(folder.parents[2])
    result = store.lookup(folder.parent.name, entry["key"])
    if result is None:
        raise FileNotFoundError(f"stage output {folder} named by the run record is gone from the store, or damaged")
    recorded = {k: v["sha256"] for k, v in entry["outputs"].items()}
    if {k: v.sha256 for k, v in result.outputs.items()} != recorded:
        raise FileNotFoundError(f"stage output {folder} no longer holds what the run record names (content hashes differ)")
    return result


def model_source(store: Store, models_from: str | None) -> RunFolder:
    """The pipeline run whose models are evaluated: the one named, or the latest completed one."""
    if models_from:
        run = store.open_run(models_from)
        if run.flow != "pipeline" or run.record.get("status") != "completed":
            raise ValueError(f"models_from={models_from!r} is a {run.flow} run with status {run.record.get('status')!r}; "
                             "it must be a completed pipeline run")  # fmt: skip
        return run
    done = [r for r in store.runs() if r.flow == "pipeline" and r.record.get("status") == "completed"]
    if not done:
        raise ValueError(f"no completed pipeline run in {store.root}: run the pipeline first (it trains the models)")
    return max(done, key=lambda r: (r.record.get("finished", ""), r.run_id))


def previous_run(store: Store, deployment: str, before: RunFolder) -> RunFolder | None:
    """The latest completed re-evaluation of the same deployment that started before `before`."""
    started = before.record["started"]
    runs = [r for r in store.runs() if r.flow == "reevaluate" and r.run_id != before.run_id
            and r.record.get("status") == "completed" and r.record.get("deployment") == deployment
            and (r.record.get("started", ""), r.run_id) <= (started, before.run_id)]  # fmt: skip
    return max(runs, key=lambda r: (r.record.get("started", ""), r.run_id)) if runs else None


def _report_rows(run: RunFolder, dataset: str) -> list[dict] | None:
    stage = run.record["stages"].get(f"{dataset}/report")
    return None if stage is None else stage["info"]["systems"]


def _artifact_key(dataset: str) -> str:
    return "drift-" + dataset.replace("_", "-").lower()


@flow(name="reevaluate", flow_run_name=run_name("reevaluate"), log_prints=True)
def reevaluate_flow(cfg: PipelineConfig, drift: DriftConfig, models_from: str | None = None, deployment: str = "local") -> dict:
    """Evaluate the models of a pipeline run on the current data; compare with the previous re-evaluation."""
    store = Store(cfg.store.root)
    source = model_source(store, models_from)
    sft = _stage_of(source.record["stages"]["sft"], source)
    run = start_run(cfg, "reevaluate")
    run.record.update(models_from=source.run_id, deployment=deployment,
                      models_code={name: st.get("code", "") for name, st in source.record["stages"].items()
                                   if name in {stage_of(t).name for t in MODEL_TASKS}})  # fmt: skip
    print(f"re-evaluating the models of pipeline run {source.run_id} (code {source.record.get('code_version', '?')}) "
          f"with code {run.record['code_version']}")
    try:
        prepared = prepare_stages(cfg, run)
        if "holdout" in prepared:  # the models must never have trained on an image they are evaluated on
            run.record.setdefault("checks", {})["leakage_model_sft"] = leakage_task(prepared["holdout"], sft)
        with placed(SourceRunModels(source)):
            models = build_models(cfg, run, sft)
        run.save()
        reports = {}
        for name in cfg.evaluate.datasets:
            if EVAL_SETS[name] in prepared:
                reports[name] = evaluate_flow(cfg, run.run_id, name, prepared[EVAL_SETS[name]], sft, models)
                run.record = store.open_run(run.run_id).record  # the subflow added its stages
        before = previous_run(store, deployment, run)
        findings: dict[str, list[str]] = {}
        for name in reports:
            table = compare_metrics(_report_rows(before, name) if before else None, _report_rows(run, name), drift, name)
            ref = write_table(table, "drift", run.path / f"drift-{name}.parquet")
            findings[name] = drift_findings(table)
            create_markdown_artifact(key=_artifact_key(name), markdown=drift_markdown(table, name, before and before.run_id, run.run_id),
                                     description=f"drift on {name}: " + ("; ".join(findings[name]) or "none"))  # fmt: skip
            run.record.setdefault("drift", {})[name] = {"previous_run": before and before.run_id, "table": ref.path,
                                                        "findings": findings[name]}  # fmt: skip
            for line in findings[name]:
                print(f"DRIFT on {name}: {line}")
    except BaseException as exc:
        end_run(run, exc)
        raise
    run.finish("completed", reports={k: v.dir for k, v in reports.items()})
    drifted = {k: v for k, v in findings.items() if v}
    if drifted and drift.fail_on_drift:
        raise DriftDetected("; ".join(f"{k}: {', '.join(v)}" for k, v in drifted.items()))
    return {"run": run, "reports": reports, "drift": run.record.get("drift", {})}


@flow(name="saec-evaluate", flow_run_name=run_name("saec-evaluate"), log_prints=True)
def saec_evaluate(
    config: str | None = None,
    overrides: list[str] | None = None,
    models_from: str | None = None,
    drift: DriftConfig | None = None,
    distributed: bool = False,
    remote: RemoteConfig | None = None,
) -> dict[str, Any]:
    """Re-evaluate trained models on the current data and flag drift against this deployment's previous run."""
    from prefect.runtime import deployment as this_deployment
    from prefect.runtime import flow_run

    cfg = entry_config(config, overrides)
    name = this_deployment.name
    where = f"{flow_run.flow_name}/{name}" if name else "local"
    with stage_placement(cfg, distributed, remote) as stages:
        out = reevaluate_flow(cfg, drift or DriftConfig(), models_from, where)
    return run_summary(out["run"], dispatched=stages.dispatched if stages else []) | {
        "deployment": where, "models_from": out["run"].record["models_from"], "drift": out["drift"]}  # fmt: skip
