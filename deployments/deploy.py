"""Create, serve and trigger the SAEC deployments declared in `deployments/prefect.yaml`.

    saec deploy apply              work pools (process type) + every deployment, on the server PREFECT_API_URL names
    saec deploy serve              every deployment served by this one process (no pools, no workers)
    saec deploy worker --pool P    a Prefect worker of work pool P
    saec deploy run NAME [--set ...] [--wait]   one flow run of a deployment, e.g. saec-pipeline/distributed

`prefect.yaml` stays the single description of the deployments: `apply` hands it to
`prefect deploy`, and `serve` reads the same entries.

Stage runs are watched: their deployments set `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` in their
job variables, so each run sends a heartbeat event that often, and `apply` creates the
automation `STAGE_WATCH`, which marks such a run Crashed when neither a heartbeat nor a state
change came for `SILENT_PERIODS` periods (its worker's machine died, and nobody is left to
report the run's end). The parent that sent the stage then sends it again.

`serve` and `worker` run their Prefect process as a supervised child (`supervise`): one Ctrl-C
stops it, also when the Prefect server has gone away and the process would wait on it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from rich.console import Console

PREFECT_FILE = Path(__file__).resolve().with_name("prefect.yaml")
WORK_POOL_TYPE = "process"

console = Console()
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prefect deployments of SAEC: apply, serve, worker, run.")


class SpecError(ValueError):
    """The deployments file is malformed; the message names the entry."""


def load_spec(path: str | Path = PREFECT_FILE) -> dict[str, Any]:
    """The deployments file, YAML anchors resolved."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"deployments file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    entries = spec.get("deployments")
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{path}: no `deployments:` list")
    for i, d in enumerate(entries):
        for field in ("name", "entrypoint", "work_pool"):
            if not d.get(field):
                raise SpecError(f"{path}: deployment #{i + 1} ({d.get('name', '?')}) has no {field!r}")
    return spec


def _flow_of(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)


def deployment_names(spec: dict[str, Any]) -> list[str]:
    """'<flow name>/<deployment name>' of every entry (imports the flows to learn their names)."""
    return [f"{_flow_of(d['entrypoint']).name}/{d['name']}" for d in spec["deployments"]]


def work_pool_names(spec: dict[str, Any]) -> list[str]:
    return sorted({d["work_pool"]["name"] for d in spec["deployments"]})


# What each pool's workers are for, shown on the pool's page in the UI.
POOL_DESCRIPTIONS = {
    "edge": "SAEC edge stages (edge training and classification, on CPU; CUDA hidden) and the parent run of "
            "distributed pipelines. Start a worker on each CPU machine: saec deploy worker --pool edge",
    "cloud": "SAEC cloud stages (building, QLoRA training and scoring of the vision-language models) and the "
             "in-process pipeline and evaluation runs. Start a worker on each GPU machine: "
             "saec deploy worker --pool cloud",
}


def ensure_work_pools(names: list[str], pool_type: str = WORK_POOL_TYPE) -> list[str]:
    """Create each work pool that does not exist yet (of `pool_type`), with its description; give an
    existing pool without one its description. Returns the names created."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    if pool_type != WORK_POOL_TYPE:
        raise ValueError(f"only {WORK_POOL_TYPE!r} work pools are created here; create {pool_type!r} pools with `prefect work-pool create`")

    async def go() -> list[str]:
        created = []
        async with get_client() as client:
            for name in names:
                try:
                    pool = await client.read_work_pool(name)
                except ObjectNotFound:
                    template = ProcessWorker.get_default_base_job_template()
                    await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template,
                                                                 description=POOL_DESCRIPTIONS.get(name)))
                    created.append(name)
                    continue
                if not pool.description and name in POOL_DESCRIPTIONS:
                    await client.update_work_pool(name, WorkPoolUpdate(description=POOL_DESCRIPTIONS[name]))
                if pool.type != pool_type:
                    console.print(f"[yellow]work pool {name!r} exists with type {pool.type!r}; its workers must run SAEC's flows[/yellow]")
        return created

    return asyncio.run(go())


# ------------------------------------------------------------------ the stage watch

HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
MIN_HEARTBEAT_S = 30  # Prefect sends heartbeats at most this often
STAGE_WATCH = "saec-crash-silent-stage-runs"
SILENT_PERIODS = 2  # heartbeat periods without a sign of life before a watched run is marked Crashed
# what a live run sends, or ends with; Pending (a worker took it) also starts the watch, so a
# machine that dies while the run's process starts is caught too
SIGNS_OF_LIFE = {"prefect.flow-run.heartbeat", "prefect.flow-run.Running"}
ENDS = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Crashed", "Cancelled", "TimedOut")}


def heartbeat_periods(spec: dict[str, Any]) -> dict[str, int]:
    """'<flow>/<deployment>' -> heartbeat period in s, of the deployments whose job variables set one."""
    out = {}
    for d in spec["deployments"]:
        env = ((d["work_pool"].get("job_variables") or {}).get("env") or {})
        if HEARTBEAT_ENV not in env:
            continue
        try:
            period = int(env[HEARTBEAT_ENV])
        except (TypeError, ValueError):
            period = 0
        if period < MIN_HEARTBEAT_S:
            raise SpecError(f"deployment {d['name']}: {HEARTBEAT_ENV}={env[HEARTBEAT_ENV]!r}: expected whole seconds, "
                            f"at least {MIN_HEARTBEAT_S}")  # fmt: skip
        out[f"{_flow_of(d['entrypoint']).name}/{d['name']}"] = period
    return out


def stage_watch(deployment_ids: list[str], period_s: int):
    """The automation that marks a run of these deployments Crashed once it falls silent.

    Prefect's recipe for zombie flow runs (a proactive trigger on `prefect.flow-run.heartbeat`),
    narrowed to the watched deployments: other runs send heartbeats every 180 s by default and
    must not be judged by this period.
    """
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    silence = SILENT_PERIODS * period_s
    return AutomationCore(
        name=STAGE_WATCH,
        description=f"SAEC: marks a stage run Crashed after {silence} s without a heartbeat (its worker's machine "
                    "died); the parent run then sends the stage to another worker of the pool. Made by `saec deploy apply`.",
        trigger=EventTrigger(
            # every sign of life opens a new window: a run that dies after its Running event and before its
            # next heartbeat (a short stage killed in its first 30 s) is caught as well
            after={"prefect.flow-run.Pending"} | SIGNS_OF_LIFE,
            expect=SIGNS_OF_LIFE | ENDS,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "deployment",
                           "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {silence} s: the run's worker or machine is gone")],
    )  # fmt: skip


def ensure_stage_watch(spec: dict[str, Any]) -> str | None:
    """Create or update the stage watch for the file's watched deployments that the server has;
    remove it when there are none. Returns what it did, for the operator."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    periods = heartbeat_periods(spec)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(STAGE_WATCH)
        ids = {}
        for name in periods:
            try:
                ids[name] = str(client.read_deployment_by_name(name).id)
            except ObjectNotFound:
                pass  # not applied (yet): `apply --name` of other deployments
        periods = {n: p for n, p in periods.items() if n in ids}
        if not periods:
            for a in existing:
                client.delete_automation(a.id)
            return f"removed automation {STAGE_WATCH}" if existing else None
        watch = stage_watch(list(ids.values()), max(periods.values()))
        for extra in existing[1:]:
            client.delete_automation(extra.id)
        if existing:
            client.update_automation(existing[0].id, watch)
        else:
            client.create_automation(watch)
    return (f"automation {STAGE_WATCH}: runs of {', '.join(periods)} are marked Crashed after "
            f"{watch.trigger.within.total_seconds():.0f} s without a heartbeat")  # fmt: skip


def apply(prefect_file: str | Path = PREFECT_FILE, names: list[str] | None = None, workdir: str | Path | None = None) -> None:
    """Create the work pools, then the deployments (all, or those named '<flow>/<deployment>'), then the stage watch."""
    prefect_file = Path(prefect_file).resolve()
    spec = load_spec(prefect_file)
    created = ensure_work_pools(work_pool_names(spec))
    if created:
        console.print(f"created work pool(s): {', '.join(created)} ({WORK_POOL_TYPE})")
    which = [arg for n in names for arg in ("--name", n)] if names else ["--all"]
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", *which, "--prefect-file", str(prefect_file)]
    done = subprocess.run(cmd, cwd=workdir or Path.cwd(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`prefect deploy` failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    if (watch := ensure_stage_watch(spec)) is not None:
        console.print(watch)


def runner_deployments(spec: dict[str, Any], names: list[str] | None = None) -> list:
    """The file's deployments as `RunnerDeployment`s for `prefect.serve` (work pools do not apply)."""
    from prefect.schedules import Cron, Interval

    out = []
    for d in spec["deployments"]:
        fl = _flow_of(d["entrypoint"])
        if names and f"{fl.name}/{d['name']}" not in names:
            continue
        schedules = []
        for s in d.get("schedules") or []:
            if "cron" in s:
                schedules.append(Cron(s["cron"], timezone=s.get("timezone")))
            elif "interval" in s:
                schedules.append(Interval(s["interval"], timezone=s.get("timezone")))
            else:
                raise SpecError(f"deployment {d['name']}: only cron and interval schedules are served here")
        out.append(fl.to_deployment(name=d["name"], parameters=d.get("parameters") or {}, tags=d.get("tags") or [],
                                    description=d.get("description"), schedules=schedules or None))  # fmt: skip
    if names and len(out) != len(names):
        raise SpecError(f"unknown deployment(s) among {names}; known: {deployment_names(spec)}")
    return out


def trigger(name: str, parameters: dict[str, Any] | None = None, wait_s: float | None = 0, poll_s: float = 5):
    """Start a flow run of deployment `name`; with `wait_s` (None = forever), wait for its final state."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters or {}, timeout=0, as_subflow=False)
    if wait_s == 0:
        return run
    t0 = time.monotonic()
    with get_client(sync_client=True) as client:
        while wait_s is None or time.monotonic() - t0 < wait_s:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            time.sleep(poll_s)
    return run


# ------------------------------------------------------------------ supervised processes


class _Signalled(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum, frame):
    raise _Signalled(signum)


def _group_gone(child: subprocess.Popen, timeout: float) -> bool:
    """Whether, within `timeout` s, the child has exited and nothing is left in its process group."""
    end = time.monotonic() + timeout
    while True:
        child.poll()  # reap it, so that it no longer counts as a member
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.1)


def supervise(cmd: list[str], grace: float = 10.0, kill_after: float = 5.0, what: str | None = None) -> int:
    """Run `cmd` as a child in a session of its own; stop it on SIGINT or SIGTERM, also when it hangs.

    A terminal's Ctrl-C reaches only this process. The first SIGINT or SIGTERM it gets is passed on
    as one SIGINT, Prefect's graceful stop. If the child's process group (the child and what it started
    there, such as the flow runs of `serve`) is not gone `grace` s later, or at a second signal, the
    group gets SIGTERM, and SIGKILL `kill_after` s after that. Returns the child's exit code (128 + N for a child ended
    by signal N); when the child had to be stopped, 128 + the signal this process got (130 for SIGINT).
    """
    what = what or " ".join(cmd)
    old = {s: signal.signal(s, _raise_signalled) for s in (signal.SIGINT, signal.SIGTERM)}
    child = None
    try:
        try:
            child = subprocess.Popen(cmd, start_new_session=True)
            code = child.wait()
            return 128 - code if code < 0 else code
        except _Signalled as sig:
            received = sig.signum
        if child is None:
            return 128 + received
        child.send_signal(signal.SIGINT)
        why = f"still running {grace:g} s after SIGINT"
        try:
            gone = _group_gone(child, grace)
        except _Signalled:  # a second Ctrl-C: no more waiting
            gone, why = False, "interrupted twice"
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        if gone:
            return 128 - child.returncode if child.returncode < 0 else child.returncode
        print(f"{what}: {why}, most likely waiting on a Prefect server it cannot reach (or on a flow run that has "
              f"not ended); stopping it: SIGTERM, then SIGKILL after {kill_after:g} s", file=sys.stderr, flush=True)
        for sig, wait_s in ((signal.SIGTERM, kill_after), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            if _group_gone(child, wait_s):
                break
        return 128 + received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------ command line

FileOpt = Annotated[Path, typer.Option("--file", "-f", help="deployments file")]
NameOpt = Annotated[Optional[list[str]], typer.Option("--name", "-n", help="'<flow>/<deployment>' (repeatable); default: all")]
LimitOpt = Annotated[Optional[int], typer.Option(help="most flow runs at once")]
GraceOpt = Annotated[float, typer.Option(help="seconds it gets to stop after Ctrl-C before it is terminated")]


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


@app.command("apply")
def apply_cmd(prefect_file: FileOpt = PREFECT_FILE, name: NameOpt = None) -> None:
    """Create the work pools and deployments on the Prefect server (run it from the repository root)."""
    try:
        apply(prefect_file, name)
    except (SpecError, RuntimeError) as exc:
        _fail(str(exc))
    for n in name or deployment_names(load_spec(prefect_file)):
        console.print(f"deployed {n}")
    pools = work_pool_names(load_spec(prefect_file))
    console.print("start a worker per pool: " + "; ".join(f"saec deploy worker --pool {p}" for p in pools))


@app.command("serve")
def serve_cmd(prefect_file: FileOpt = PREFECT_FILE, name: NameOpt = None, limit: LimitOpt = None,
              grace: GraceOpt = 10.0) -> None:  # fmt: skip
    """Serve the deployments from one process: no work pools, no workers (one machine). Ctrl-C stops it."""
    cmd = [sys.executable, "-m", "saec.deployments.deploy", "serve-here", "--file", str(prefect_file)]
    cmd += [arg for n in name or [] for arg in ("--name", n)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    raise typer.Exit(supervise(cmd, grace, what="saec deploy serve"))


@app.command("serve-here", hidden=True)
def serve_here_cmd(prefect_file: FileOpt = PREFECT_FILE, name: NameOpt = None, limit: LimitOpt = None) -> None:
    """`serve` in this process, unsupervised."""
    from prefect import serve

    try:
        spec = load_spec(prefect_file)
        deployments = runner_deployments(spec, name)
        periods = heartbeat_periods(spec)
    except SpecError as exc:
        _fail(str(exc))
    # served runs get no job variables: the watched deployments' heartbeat period applies to all of them
    serve(*deployments, limit=limit, heartbeat_seconds=min(periods.values()) if periods else None)


@app.command("worker")
def worker_cmd(
    pool: Annotated[str, typer.Option("--pool", "-p", help="work pool, e.g. edge or cloud")],
    limit: LimitOpt = None,
    grace: GraceOpt = 10.0,
) -> None:
    """Start a Prefect worker of a work pool (`prefect worker start`); one Ctrl-C stops it, server or not."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    raise typer.Exit(supervise(cmd, grace, what=f"prefect worker of pool {pool!r}"))


@app.command("run")
def run_cmd(
    deployment: Annotated[str, typer.Argument(help="'<flow>/<deployment>', e.g. saec-pipeline/distributed")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of config sections")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="config override, section.field=value")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="other flow parameter, key=value (YAML)")] = None,
    wait: Annotated[bool, typer.Option(help="wait for the run's final state")] = False,
) -> None:
    """Start a run of a deployment; config and overrides go to its `config` and `overrides` parameters."""
    params: dict[str, Any] = {}
    if config is not None:
        params["config"] = str(config)
    if set_:
        params["overrides"] = list(set_)
    for item in param or []:
        key, sep, raw = item.partition("=")
        if not sep:
            _fail(f"--param {item!r}: expected key=value")
        params[key.strip()] = yaml.safe_load(raw)
    run = trigger(deployment, params, wait_s=None if wait else 0)
    console.print(f"flow run {run.name} ({run.id}): {run.state.name if run.state else 'scheduled'}")
    if wait and run.state is not None and not run.state.is_completed():
        console.print(f"[red]{run.state.message}[/red]")
        console.print(f"retry it with: prefect flow-run retry {run.id}")
        raise typer.Exit(1)


if __name__ == "__main__":  # python -m saec.deployments.deploy ... (the same as `saec deploy ...`)
    from saec.env import configure_offline

    configure_offline()
    app(prog_name="saec deploy")
