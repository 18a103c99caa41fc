"""The `saec` command line: everything the flows do, from one entry point."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from saec.env import configure_offline

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SAEC: scene-aware edge-cloud visual inspection.")
console = Console()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of config sections")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override, e.g. --set holdout.n_good=100")]


def _load(config: Path | None, overrides: list[str] | None):
    """Validate the configuration, then point Prefect's result storage into the artifact store."""
    from saec.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    store = cfg.store.root.resolve()
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(store / "prefect"))
    return cfg


def _stage_table(run_record: dict) -> Table:
    table = Table(title=f"run {run_record['run_id']}")
    for col in ("stage", "state", "outputs", "details"):
        table.add_column(col)
    for name, st in run_record["stages"].items():
        outputs = ", ".join(f"{k} ({v['rows']} rows)" if v.get("rows") is not None else k for k, v in st["outputs"].items())
        info = st.get("info", {})
        detail = info.get("counts") or info.get("actual") or info.get("train") or ""
        if isinstance(detail, dict):
            detail = " ".join(f"{k}={v}" for k, v in detail.items() if not str(k).startswith("quarantined:"))
        colour = "green" if st["state"] == "cached" else "cyan"
        table.add_row(name, f"[{colour}]{st['state']}[/{colour}]", outputs, str(detail))
    return table


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
            console.print(f"{name}: {out[name].dir}/val  {info}")
    checks = run.record.get("checks", {})
    if "leakage" in checks:
        console.print(f"[green]leakage check passed[/green]: {checks['leakage']['files_checked']} holdout files hashed, none in SFT train")
    states = [st["state"] for st in run.record["stages"].values()]
    console.print(f"stages: {states.count('ran')} ran, {states.count('cached')} cached; run record: {run.path / 'run.json'}")


@app.command()
def prepare(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Build the SFT split, the MVTec AD holdout and the KolektorSDD2 1:1 set."""
    cfg = _load(config, set_)
    from saec.flows.prepare import prepare_flow

    t0 = time.perf_counter()
    out = prepare_flow(cfg)
    _report_prepare(out)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The whole pipeline on the configured data (by default the embedded synthetic data)."""
    cfg = _load(config, set_)
    from saec.flows.prepare import prepare_flow

    t0 = time.perf_counter()
    out = prepare_flow(cfg)
    _report_prepare(out)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


@app.command()
def synth(out: Annotated[Path, typer.Argument(help="folder to write mvtec_ad/ and ksdd2/ into")], seed: int = 2025) -> None:
    """Write the synthetic datasets to a folder, to look at or to use as `data.source=folders`."""
    from saec.datasets.synthetic import SyntheticConfig, generate_all

    counts = generate_all(out, SyntheticConfig(seed=seed))
    console.print(counts)


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective configuration (defaults, file, overrides) as YAML."""
    import yaml

    cfg = _load(config, set_)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def main() -> None:
    configure_offline()
    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":
    main()
