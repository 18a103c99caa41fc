"""The `saec` command line: everything the flows do, from one entry point."""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from saec.env import configure_offline

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SAEC: scene-aware edge-cloud visual inspection.")


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="show the traceback of every error")] = False) -> None:
    if debug:
        os.environ["SAEC_DEBUG"] = "1"


def _debug() -> bool:
    return os.environ.get("SAEC_DEBUG", "").lower() in {"1", "true", "yes", "on"}
console = Console(width=None if sys.stdout.isatty() else 160)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of config sections")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. --set holdout.n_good=100")]


def _load(config: Path | None, overrides: list[str] | None):
    """The validated configuration; a wrong one ends the command with the error, before any work."""
    from saec.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _start(cfg) -> None:
    """Before a flow runs: dataset folders that are what they are named, a writable store, and
    Prefect's local server started (one process at a time)."""
    from saec.artifacts.store import Store
    from saec.datasets import ksdd2, mvtec
    from saec.env import start_prefect_api

    if cfg.data.source == "folders":  # a wrong root fails in a second, not after the server has started
        for root, reader in ((cfg.data.mvtec_root, mvtec), (cfg.data.ksdd2_root, ksdd2)):
            if root is not None:
                reader.check_root(Path(root).expanduser())
    Store(cfg.store.root).check_writable()
    start_prefect_api()
    if not _debug():
        _quiet_actionable_tracebacks()


class _NoTraceback(logging.Filter):
    """Leave an actionable error to the command's own one-line message.

    Prefect logs every failed task and flow run, with the traceback; for an error whose
    message says what to do, those lines only bury it. Other failures are logged as before.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from saec.errors import ActionableError

        if record.exc_info and isinstance(record.exc_info[1], ActionableError):
            return False
        if record.levelno >= logging.ERROR:
            found = re.search(r"exception:? (\w+)[:(]", record.getMessage())
            return not (found and found.group(1) in _actionable_names())
        return True


def _actionable_names() -> set[str]:
    from saec.errors import ActionableError

    names, todo = set(), [ActionableError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def _quiet_actionable_tracebacks() -> None:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, _NoTraceback) for f in handler.filters):
            handler.addFilter(_NoTraceback())


def _stage_table(run_record: dict) -> Table:
    table = Table(title=f"run {run_record['run_id']}")
    for col in ("stage", "state", "time s", "outputs", "details"):
        table.add_column(col, justify="right" if col == "time s" else "left")
    for name, st in run_record["stages"].items():
        outputs = ", ".join(f"{k} ({v['rows']} rows)" if v.get("rows") is not None else k for k, v in st["outputs"].items())
        info = st.get("info", {})
        detail = info.get("counts") or info.get("actual") or info.get("train") or info.get("trained_on") or ""
        if isinstance(detail, dict):
            detail = " ".join(f"{k}={v}" for k, v in detail.items() if not str(k).startswith("quarantined:"))
        colour = "green" if st["state"] == "cached" else "cyan"
        table.add_row(name, f"[{colour}]{st['state']}[/{colour}]", _stage_seconds(st), outputs, str(detail))
    return table


def _stage_seconds(st: dict) -> str:
    """This run's time on a stage; for one taken from the store, what its build took, in brackets."""
    from saec.inspect import stage_seconds

    seconds, built = stage_seconds(st)
    if seconds is None and built is None:
        return "n/a"
    text = "" if seconds is None else f"{seconds:.1f}"
    return text + (f" (built in {built:.1f})" if st["state"] == "cached" and built is not None else "")


def _report_prepare(out: dict) -> None:
    run = out["run"]
    console.print(_stage_table(run.record))
    for name in ("scan_mvtec", "scan_ksdd2"):
        if name in out:
            q = out[name].table("quarantine")
            if len(q):
                console.print(f"[yellow]{name}: {len(q)} file(s) quarantined[/yellow] (see {out[name].path('quarantine')})")
                for reason, n in q.reason.value_counts().items():
                    console.print(f"   {reason}: {n}")
    for name in ("holdout", "ksdd2_1to1"):
        if name in out:
            info = out[name].info
            counts = info.get("actual") or info
            console.print(f"{name}: {counts.get('good')} good + {counts.get('defect')} defect images  ({out[name].dir}/val)")
            if "shortfall" in info:
                console.print(f"[yellow]warning: {name}: {info['shortfall']}[/yellow]")
    checks = run.record.get("checks", {})
    if "leakage" in checks:
        console.print(f"[green]leakage check passed[/green]: {checks['leakage']['files_checked']} holdout files hashed, none in SFT train")
    states = [st["state"] for st in run.record["stages"].values()]
    console.print(f"stages: {states.count('ran')} ran, {states.count('cached')} cached; run record: {run.path / 'run.json'}")
    from saec.inspect import flow_run_link

    link = flow_run_link(run.record)
    if link:
        console.print(f"Prefect UI: {link}")


@app.command()
def prepare(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Build the SFT split, the MVTec AD holdout and the KolektorSDD2 1:1 set."""
    cfg = _load(config, set_)
    _start(cfg)
    from saec.flows.prepare import prepare_flow

    t0 = time.perf_counter()
    out = prepare_flow(cfg)
    _report_prepare(out)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


@app.command()
def pretrain(
    out: Annotated[Path, typer.Argument(help="folder to export the stand-ins and provenance.json into")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the embedded stand-in models on the pretraining world (`pretrain.*`) and export them."""
    cfg = _load(config, set_)
    _start(cfg)
    from saec.flows.pretrain import pretrain_flow

    t0 = time.perf_counter()
    result = pretrain_flow(cfg, out)
    console.print(_stage_table(result["run"].record))
    record = result["provenance"]
    for name, metrics in record["metrics_on_world_val"].items():
        console.print(f"{name}: {metrics}")
    size = sum(f["bytes"] for f in record["files"].values())
    console.print(f"exported {len(record['files'])} files, {size / 2**20:.1f} MiB, to {out} "
                  f"(provenance.json); done in {time.perf_counter() - t0:.1f} s")


def _results_table(name: str, report) -> Table:
    """A report's systems as its results table shows them: the same names, headings and rounding."""
    from saec.flows.evaluate import results_rows

    systems = report.info["systems"]
    first = systems[0] if systems else {}
    counts = f" ({first.get('n_good')} good, {first.get('n_defect')} defect)" if "n_good" in first else ""
    table = Table(title=f"results: {name}{counts}")
    rows = results_rows(report, explain=False)
    for col in rows[0] if rows else ["system"]:
        if col == "system":
            table.add_column(col, justify="left")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row.values())
    return table


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    operating_point: Annotated[Optional[str], typer.Option(help="SWEEP.parquet:POINT from `saec sweep`")] = None,
    distributed: Annotated[bool, typer.Option(
        "--distributed", help="send the edge and cloud stages to workers of the edge and cloud work pools (needs "
        "PREFECT_API_URL, the deployments applied, and a store.root every machine reaches, e.g. s3://bucket/prefix)")] = False,
    edge_shards: Annotated[int, typer.Option(min=1, help="with --distributed: edge classification as this many "
                                             "stage runs, spread over the edge workers")] = 1,
) -> None:
    """The whole pipeline on the configured data (by default the embedded synthetic data)."""
    overrides = list(set_ or [])
    if operating_point:
        import pandas as pd

        from saec.tasks.sweep import operating_point_overrides

        path, _, point = operating_point.rpartition(":")
        if not path or not point.isdigit():
            console.print("[red]error:[/red] --operating-point takes SWEEP.parquet:POINT")
            raise typer.Exit(2)
        overrides = operating_point_overrides(pd.read_parquet(path), int(point)) + overrides
    if edge_shards > 1 and not distributed:
        console.print("[red]error:[/red] --edge-shards spreads edge classification over the edge pool's workers: add "
                      "--distributed (one machine classifies in one stage run)", soft_wrap=True, highlight=False)  # fmt: skip
        raise typer.Exit(2)
    cfg = _load(config, overrides)
    if distributed and not _api_url():
        console.print("[red]error:[/red] --distributed sends stages to work pools on a Prefect server: set PREFECT_API_URL "
                      "to it (see deployments/README.md)", soft_wrap=True, highlight=False)  # fmt: skip
        raise typer.Exit(2)
    _start(cfg)
    from saec.flows.pipeline import pipeline_flow
    from saec.flows.remote import RemoteConfig, run_summary, stage_placement

    t0 = time.perf_counter()
    with stage_placement(cfg, distributed, RemoteConfig(edge_shards=edge_shards)) as stages:
        out = pipeline_flow(cfg)
    if stages:  # which stage ran where, in the run record
        run_summary(out["run"], dispatched=stages.dispatched)
    for sent in stages.dispatched if stages else []:
        console.print(f"  sent {sent['stage']} to {sent['deployment']}: flow run {sent['flow_run']} "
                      f"({'cached' if sent['cached'] else 'ran'} on {sent['host']})", highlight=False)  # fmt: skip
    _report_prepare(out)
    for name, report in out["reports"].items():
        console.print(_results_table(name, report))
        for note in report.info["notes"]:
            console.print(f"  - {note}")
        console.print(f"  report: {report.path('markdown')}  figure: {report.path('figure')}")
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


def _pick_run(store_root: Path, run_id: str | None, flow: str = "pipeline"):
    from saec.artifacts.store import Store

    store = Store(store_root)
    if run_id:
        return store.open_run(run_id)
    runs = [r for r in store.runs() if r.flow == flow and r.record.get("status") == "completed"]
    if not runs:
        console.print(f"[red]error:[/red] no completed {flow} run in {store.root}; run `saec run` first")
        raise typer.Exit(2)
    return runs[-1]


@app.command("sweep")
def sweep_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_id: Annotated[Optional[str], typer.Option("--run", help="pipeline run to sweep (default: the latest)")] = None,
    dataset: Annotated[str, typer.Option(help="evaluation set")] = "mvtec_holdout",
    choose: Annotated[Optional[int], typer.Option(help="mark this operating point and print how to run it")] = None,
) -> None:
    """Recompute SAEC's routing and metrics over a threshold grid from cached tables; no model runs."""
    import pandas as pd

    from saec.artifacts.store import read_table
    from saec.tasks.sweep import operating_point_overrides, plot_sweep, sweep

    cfg = _load(config, set_)
    run_ = _pick_run(cfg.store.root, run_id)
    stages = run_.record["stages"]
    need = [f"{dataset}/complexity", f"{dataset}/edge_only", f"{dataset}/cloud_only"]
    missing = [n for n in need if n not in stages]
    if missing:
        console.print(f"[red]error:[/red] run {run_.run_id} lacks {missing}: the sweep needs the saec, edge_only and cloud_only systems")
        raise typer.Exit(2)
    src = "holdout" if dataset == "mvtec_holdout" else dataset
    labels = read_table(stages[src]["outputs"]["manifest"]["path"])[["image_id", "label"]]

    def cost(name: str) -> dict:
        st = stages[name]
        n, sec = st["info"]["images"], st["info"]["seconds"]
        wh = (st["info"].get("telemetry") or {}).get("energy_wh")
        return {"s_per_image": sec / n, "wh_per_image": wh / n if wh is not None else None}

    table = sweep(
        labels,
        read_table(stages[need[0]]["outputs"]["complexity"]["path"]),
        read_table(stages[need[1]]["outputs"]["predictions"]["path"]),
        read_table(stages[need[2]]["outputs"]["scores"]["path"]),
        cost(need[1]),
        cost(need[2]),
    )
    out = run_.path / f"sweep-{dataset}"
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "sweep.parquet", index=False)
    plot_sweep(table, out / "sweep.png", f"routing sweep: {dataset} (run {run_.run_id})", choose)
    front = table[table.pareto].sort_values("cloud_share")
    console.print(f"{len(table)} operating points, {len(front)} on the Pareto front (accuracy vs cloud share):")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        console.print(front[["point", *[c for c in table.columns if c in ("init_q_ratio", "smax_thr", "margin_thr", "ent_thr", "keep_bidir", "cloud_thr")], "accuracy", "cloud_share", "est_seconds"]].to_string(index=False))
    console.print(f"table: {out / 'sweep.parquet'}  plot: {out / 'sweep.png'}")
    if choose is not None:
        flags = " ".join(f"--set {o}" for o in operating_point_overrides(table, choose))
        console.print(f"run point {choose}: saec run --operating-point {out / 'sweep.parquet'}:{choose}\n  (same as: saec run {flags})")


@app.command("runs")
def runs_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """List the runs in the artifact store (the same as `saec inspect runs`)."""
    from saec.inspect import print_runs

    print_runs(_load(config, set_).store.root)


@app.command()
def synth(out: Annotated[Path, typer.Argument(help="folder to write mvtec_ad/ and ksdd2/ into")], seed: int = 2025) -> None:
    """Write the synthetic datasets to a folder, to look at or to use as `data.source=folders`."""
    from saec.config import DataConfig
    from saec.datasets.synthetic import generate_all

    counts = generate_all(out, DataConfig().synthetic.model_copy(update={"seed": seed}))  # the embedded default's data
    console.print(counts)


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective configuration (defaults, file, overrides) as YAML."""
    import yaml

    cfg = _load(config, set_)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# --- operations: artifact inspection (saec/inspect.py) and deployments (deployments/deploy.py) ---
from saec.inspect import app as _inspect_app  # noqa: E402

app.add_typer(_inspect_app, name="inspect", help="Runs, metrics, tables and Prefect artifacts: list, show, compare.")


@app.command("deploy", add_help_option=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def deploy_cmd(ctx: typer.Context) -> None:
    """Prefect deployments: apply (work pools + deployments), serve, worker, run. See `saec deploy --help`."""
    from saec.deployments.deploy import app as deploy_app

    typer.main.get_command(deploy_app)(args=ctx.args, prog_name="saec deploy")
# --- end operations


def main() -> None:
    import errno

    from saec.errors import ActionableError

    configure_offline()
    try:
        app()  # usage errors and typer.Exit end the process here, with their exit codes
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
    except ActionableError as exc:
        if _debug():
            raise
        console.print(f"[red]error:[/red] {' '.join(str(exc).split())}", soft_wrap=True, highlight=False)
        sys.exit(1)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or _debug():
            raise
        what = "no space left on the device" if exc.errno != errno.EROFS else "read-only file system"
        console.print(f"[red]error:[/red] {what} writing {exc.filename or 'a file'}: free space or make it writable, "
                      "or set store.root to a writable folder with room", soft_wrap=True, highlight=False)  # fmt: skip
        sys.exit(1)



if __name__ == "__main__":
    main()
