"""Looking into the artifact store and Prefect's artifacts: runs, one run's metrics and tables, two runs side by side.

    saec inspect runs                      every run in the store (also `saec runs`)
    saec inspect show RUN                  a run's stages, metrics and Parquet tables
    saec inspect show RUN --table mvtec_holdout/report:metrics     the first rows of one table
    saec inspect compare RUN_A RUN_B       metrics and stage outputs, side by side
    saec inspect artifacts [--key drift]   the latest keyed Prefect artifacts (metrics, reports, drift)

RUN is a run id, a unique part of one, `latest`, or `latest:<flow>` (`latest:reevaluate`).
The functions return DataFrames; the commands print them.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from saec.artifacts.store import RunFolder, Store, read_table

METRICS = ["accuracy", "balanced_accuracy", "cloud_share", "wall_s", "serial_s", "energy_per_correct_mwh"]

# ------------------------------------------------------------------ plain functions


def runs_frame(store_root: str | Path, flow: str | None = None) -> pd.DataFrame:
    """One row per run, by start time: id, flow, status, start, wall time, stages ran/cached, evaluation sets, error."""
    rows = []
    for r in sorted(Store(store_root).runs(), key=lambda r: (r.record.get("started", ""), r.run_id)):
        if flow is not None and r.flow != flow:
            continue
        rec = r.record
        states = [s["state"] for s in rec["stages"].values()]
        rows.append({
            "run": r.run_id, "flow": r.flow, "status": rec.get("status", "?"), "started": rec.get("started", ""),
            "wall_s": rec.get("wall_s"), "ran": states.count("ran"), "cached": states.count("cached"),
            "datasets": ",".join(sorted(_datasets(rec))), "deployment": rec.get("deployment"), "error": rec.get("error"),
        })  # fmt: skip
    cols = ["run", "flow", "status", "started", "wall_s", "ran", "cached", "datasets", "deployment", "error"]
    return pd.DataFrame(rows, columns=cols)


def _datasets(record: dict) -> set[str]:
    return {name.split("/")[0] for name in record["stages"] if name.endswith("/report")}


def resolve_run(store_root: str | Path, ref: str) -> RunFolder:
    """A run by id, by a unique part of its id, or `latest` / `latest:<flow>`."""
    runs = Store(store_root).runs()
    if not runs:
        raise LookupError(f"no runs in {Store(store_root).location}/runs")
    if ref == "latest" or ref.startswith("latest:"):
        flow = ref.partition(":")[2] or None
        pick = [r for r in runs if flow is None or r.flow == flow]
        if not pick:
            raise LookupError(f"no {flow} run in the store (flows there: {sorted({r.flow for r in runs})})")
        return max(pick, key=lambda r: (r.record.get("started", ""), r.run_id))
    exact = [r for r in runs if r.run_id == ref]
    if exact:
        return exact[0]
    matches = [r for r in runs if ref in r.run_id]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise LookupError(f"no run matches {ref!r}; `saec inspect runs` lists them")
    raise LookupError(f"{ref!r} matches {len(matches)} runs: {', '.join(r.run_id for r in matches[:5])}...")


def stage_seconds(st: dict) -> tuple[float | None, float | None]:
    """(seconds this run spent on a stage, seconds its build took) from a run record's stage entry.

    A stage built in the run took its build's time; one taken from the store took the lookup's
    (None where the run did not time it alone). Records written before stages were timed give None.
    """
    seconds, built = st.get("seconds"), st.get("build_s")
    if seconds is None and st.get("state") == "ran":
        seconds = built
    return seconds, built


def stages_frame(run: RunFolder) -> pd.DataFrame:
    """One row per stage the run used: ran or cached, its time in this run and its build's, cache key,
    outputs, folder."""
    rows = []
    for name, st in run.record["stages"].items():
        seconds, built = stage_seconds(st)
        rows.append({"stage": name, "state": st["state"], "seconds": seconds, "build_s": built, "key": st["key"],
                     "outputs": ", ".join(st["outputs"]), "dir": st["dir"]})
    return pd.DataFrame(rows, columns=["stage", "state", "seconds", "build_s", "key", "outputs", "dir"])


def metrics_frame(run: RunFolder) -> pd.DataFrame:
    """Every system's metrics on every evaluation set of the run (from its report stages), as numbers."""
    rows = []
    for name, st in run.record["stages"].items():
        if name.endswith("/report"):
            for r in st["info"].get("systems", []):
                rows.append({"dataset": name.split("/")[0], "system": r["system"], "n": r.get("n"),
                             **{c: r.get(c) for c in ("n_good", "n_defect", *METRICS)}, "measured": r.get("measured")})  # fmt: skip
    return pd.DataFrame(rows, columns=["dataset", "system", "n", "n_good", "n_defect", *METRICS, "measured"])


def metrics_display(run: RunFolder) -> pd.DataFrame:
    """The run's metrics as its reports show them: the reports' system names, headings, units and
    rounding, with the image count of each class. A report recorded without its names keeps the ids."""
    from saec.tasks.report import display_rows

    frames = []
    for name, st in run.record["stages"].items():
        if name.endswith("/report"):
            systems = st["info"].get("systems", [])
            labels = st["info"].get("labels", {r["system"]: r["system"] for r in systems})
            rows = display_rows(systems, ("n_good", "n_defect", *METRICS), labels)
            frames.append(pd.DataFrame([{"dataset": name.split("/")[0], **row, "measured": r.get("measured")}
                                        for row, r in zip(rows, systems)]))  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def tables_frame(run: RunFolder) -> pd.DataFrame:
    """Every Parquet table the run's stages hold: `stage:output`, rows, schema, content hash, path."""
    rows = []
    for name, st in run.record["stages"].items():
        for out, ref in st["outputs"].items():
            if str(ref["path"]).endswith(".parquet"):
                rows.append({"table": f"{name}:{out}", "rows": ref.get("rows"), "schema": ref.get("schema_name"),
                             "sha256": ref["sha256"][:12], "path": ref["path"]})  # fmt: skip
    for path in sorted(run.path.glob("*.parquet")):  # tables written beside the run record (drift)
        rows.append({"table": f"run:{path.stem}", "rows": len(read_table(path)), "schema": None, "sha256": "", "path": str(path)})
    return pd.DataFrame(rows, columns=["table", "rows", "schema", "sha256", "path"])


def read_run_table(run: RunFolder, table: str) -> pd.DataFrame:
    """A table of the run by its `stage:output` name (see `tables_frame`)."""
    known = tables_frame(run)
    hit = known[known.table == table]
    if hit.empty:
        raise LookupError(f"run {run.run_id} has no table {table!r}; it has: {', '.join(known.table)}")
    path = Path(hit.path.iloc[0])
    if not path.exists() and run.remote is not None and ":" in table and not table.startswith("run:"):
        # a run on another machine: its stage outputs are found in the object store by stage and key
        name, _, output = table.rpartition(":")
        entry = run.record["stages"][name]
        found = Store(run.remote.url).lookup(Path(entry["dir"]).parent.name, entry["key"])
        if found is not None:
            return found.table(output)
    return read_table(path)


def compare_runs(a: RunFolder, b: RunFolder) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics, stages) of two runs side by side.

    metrics: dataset, system, metric, a, b, change (b - a), for systems evaluated in either run.
    stages: stage, state in each, and whether the two used the same outputs (same content hashes).
    """
    ma, mb = metrics_frame(a), metrics_frame(b)
    rows = []
    keys = pd.concat([ma[["dataset", "system"]], mb[["dataset", "system"]]]).drop_duplicates()
    for ds, system in keys.itertuples(index=False):
        ra = ma[(ma.dataset == ds) & (ma.system == system)]
        rb = mb[(mb.dataset == ds) & (mb.system == system)]
        for m in METRICS:
            va = _num(ra[m].iloc[0]) if len(ra) else None
            vb = _num(rb[m].iloc[0]) if len(rb) else None
            rows.append({"dataset": ds, "system": system, "metric": m, "a": va, "b": vb,
                         "change": vb - va if va is not None and vb is not None else None})  # fmt: skip
    metrics = pd.DataFrame(rows, columns=["dataset", "system", "metric", "a", "b", "change"])
    sa, sb = a.record["stages"], b.record["stages"]
    srows = []
    for name in list(sa) + [n for n in sb if n not in sa]:
        x, y = sa.get(name), sb.get(name)
        same = None
        if x is not None and y is not None:
            same = {k: v["sha256"] for k, v in x["outputs"].items()} == {k: v["sha256"] for k, v in y["outputs"].items()}
        srows.append({"stage": name, "state_a": x and x["state"], "state_b": y and y["state"], "same_outputs": same})
    return metrics, pd.DataFrame(srows, columns=["stage", "state_a", "state_b", "same_outputs"])


def _num(v: Any) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def flow_run_link(record: dict) -> str | None:
    """The Prefect UI page of a run's flow run, where a Prefect server with a UI is configured
    (PREFECT_API_URL or PREFECT_UI_URL); None for runs on Prefect's temporary local server."""
    from prefect.settings import PREFECT_UI_URL

    ui, flow_run = PREFECT_UI_URL.value(), record.get("flow_run_id")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run}" if ui and flow_run else None


def artifacts_frame(key_like: str | None = None, limit: int = 50) -> pd.DataFrame:
    """The latest version of each keyed Prefect artifact (from the server PREFECT_API_URL names)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    flt = ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(like_=key_like)) if key_like else None

    async def go():
        async with get_client() as client:
            return await client.read_latest_artifacts(artifact_filter=flt, limit=limit)

    rows = [{"key": a.key, "type": a.type, "updated": a.updated, "flow_run": str(a.flow_run_id) if a.flow_run_id else None,
             "description": a.description} for a in asyncio.run(go())]  # fmt: skip
    return pd.DataFrame(rows, columns=["key", "type", "updated", "flow_run", "description"])


# ------------------------------------------------------------------ command line

console = Console(width=None if sys.stdout.isatty() else 200)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Runs, metrics, tables and Prefect artifacts.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of config sections")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. --set store.root=/data/store")]


def _store_root(config: Path | None, overrides: list[str] | None) -> Path:
    from saec.config import ConfigError, load_config

    try:
        return load_config(config, overrides).store.root
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _run(root: Path, ref: str) -> RunFolder:
    try:
        return resolve_run(root, ref)
    except (LookupError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_frame(df: pd.DataFrame, title: str, colours: dict[str, dict[str, str]] | None = None,
                right: set[str] | None = None) -> None:
    """`df` as a table; numeric columns, and those named in `right`, aligned right."""
    table = Table(title=title)
    for col in df.columns:
        numeric = pd.api.types.is_numeric_dtype(df[col]) or col in (right or set())
        table.add_column(str(col), justify="right" if numeric else "left")
    for row in df.itertuples(index=False):
        cells = []
        for col, v in zip(df.columns, row):
            text = _fmt(v)
            colour = (colours or {}).get(col, {}).get(text)
            cells.append(f"[{colour}]{text}[/{colour}]" if colour else text)
        table.add_row(*cells)
    console.print(table)


STATE_COLOURS = {"state": {"ran": "cyan", "cached": "green"}, "status": {"completed": "green", "failed": "red"}}


def print_runs(store_root: Path, flow: str | None = None) -> None:
    frame = runs_frame(store_root, flow)
    print_frame(frame.drop(columns=["error"]), Store(store_root).location, STATE_COLOURS)
    for r in frame[frame.error.notna()].itertuples():
        console.print(f"[red]{r.run}[/red]: {r.error}")


@app.command("runs")
def runs_cmd(config: ConfigOpt = None, set_: SetOpt = None, flow: Annotated[Optional[str], typer.Option(help="only this flow")] = None) -> None:
    """Every run in the artifact store, by start time."""
    print_runs(_store_root(config, set_), flow)


@app.command("show")
def show_cmd(
    run: Annotated[str, typer.Argument(help="run id, part of one, latest, latest:<flow>")] = "latest",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    table: Annotated[Optional[str], typer.Option(help="print this table's first rows (stage:output)")] = None,
    rows: Annotated[int, typer.Option(help="rows to print with --table")] = 10,
) -> None:
    """One run: status, stages, metrics per evaluation set, and its Parquet tables."""
    r = _run(_store_root(config, set_), run)
    if table:
        try:
            df = read_run_table(r, table)
        except LookupError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            console.print(f"{table}: {len(df)} rows x {len(df.columns)} columns")
            console.print(df.head(rows).to_string(index=False))
        return
    rec = r.record
    console.print(f"run [bold]{r.run_id}[/bold]  flow {r.flow}  status {rec.get('status')}  started {rec.get('started')}  "
                  f"wall {rec.get('wall_s', '')} s" + (f"  models from {rec['models_from']}" if rec.get("models_from") else ""))  # fmt: skip
    if rec.get("deployment"):
        console.print(f"started by deployment {rec['deployment']}")
    if flow_run_link(rec):
        console.print(f"Prefect UI: {flow_run_link(rec)}")
    if rec.get("error"):
        console.print(f"[red]error:[/red] {rec['error']}")
    print_frame(stages_frame(r).drop(columns=["dir"]), "stages", STATE_COLOURS)
    metrics = metrics_display(r)
    if len(metrics):
        print_frame(metrics, "metrics", right=set(metrics.columns) - {"dataset", "system", "measured"})
    for ds, d in (rec.get("drift") or {}).items():
        console.print(f"drift on {ds} vs {d['previous_run'] or 'no earlier run'}: " + ("; ".join(d["findings"]) or "none"))
    print_frame(tables_frame(r).drop(columns=["path"]), "tables (show one with --table)")


@app.command("compare")
def compare_cmd(
    run_a: Annotated[str, typer.Argument(help="first run")],
    run_b: Annotated[str, typer.Argument(help="second run")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    all_stages: Annotated[bool, typer.Option("--all-stages", help="list stages whose outputs are equal too")] = False,
) -> None:
    """Two runs side by side: metric changes (b - a), and which stage outputs differ."""
    root = _store_root(config, set_)
    a, b = _run(root, run_a), _run(root, run_b)
    metrics, stages = compare_runs(a, b)
    console.print(f"a = {a.run_id}\nb = {b.run_id}")
    if len(metrics):
        print_frame(metrics, "metrics (change = b - a)")
    shown = stages if all_stages else stages[stages.same_outputs != True]  # noqa: E712
    print_frame(shown, "stages" + ("" if all_stages else " whose outputs differ or that only one run has"), STATE_COLOURS)
    same = int((stages.same_outputs == True).sum())  # noqa: E712
    console.print(f"{same} of {len(stages)} stages used identical outputs")


@app.command("artifacts")
def artifacts_cmd(
    key: Annotated[Optional[str], typer.Option(help="keys containing this text, e.g. drift or mvtec-holdout")] = None,
    limit: int = 50,
) -> None:
    """The latest keyed Prefect artifacts (metrics tables, reports, drift) from the Prefect server."""
    frame = artifacts_frame(f"%{key}%" if key else None, limit)
    print_frame(frame, "Prefect artifacts (latest version of each key)")
