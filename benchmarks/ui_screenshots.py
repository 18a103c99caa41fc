"""Screenshots of the Prefect UI as an operator sees SAEC's runs (headless Chromium).

Starts a Prefect server on loopback (its own PREFECT_HOME), applies the deployments, starts a worker
on the `cloud` pool, runs the in-process pipeline deployment on a small embedded draw, then
photographs the pages an operator opens: the runs list, the deployment run, the artifacts list, the
summary artifact, the report artifact (figures inside), the results table and the work pools.
Needs `chromium` (Debian's package) on PATH.

    .venv/bin/python benchmarks/ui_screenshots.py [--out docs/ui] [--work DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRAW = [  # a small embedded draw: both sets, every system, a couple of minutes on two cores
    "data.synthetic.categories=[carpet, capsule]", "data.synthetic.n_train_good=8", "data.synthetic.n_test_good=6",
    "data.synthetic.n_test_defect_per_type=2", "data.synthetic.ksdd2_n_train=12", "data.synthetic.ksdd2_n_test=8",
    "edge.train.epochs=1", "cloud.train.max_steps=2", "cloud.train.epochs=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Prefect server answered at {url} within {seconds:.0f} s")


def saec(*args: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saec.cli", *args], env=env, cwd=ROOT, check=True, **kw)


def shoot(browser: str, url: str, target: Path, height: int = 1100) -> None:
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1600,{height}", "--virtual-time-budget=20000", f"--screenshot={target}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{target.name}: {url}", flush=True)


async def find_pages(run_name_prefix: str) -> dict:
    """The top-level deployment run, its artifacts by key prefix."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterParentTaskRunId

    async with get_client() as client:
        top = [r for r in await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True))) if r.deployment_id]
        top = sorted(top, key=lambda r: r.created)[-1]
        every = await client.read_artifacts()
        mine = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[top.id])))
    latest = {}
    for a in sorted(every, key=lambda a: a.created):
        if a.key:
            latest[a.key] = a
    pick = {prefix: next((a for k, a in latest.items() if k.startswith(prefix)), None)
            for prefix in ("summary-", "mvtec-holdout-report-", "mvtec-holdout-metrics-")}
    return {"top": top, "top_artifacts": mine, **pick}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "ui")
    ap.add_argument("--work", type=Path, default=None, help="server home and store (default: a temporary folder)")
    args = ap.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: install Debian's `chromium` package")
    work = (args.work or Path(tempfile.mkdtemp(prefix="saec-ui-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect"), PREFECT_API_URL=f"{ui}/api", PYTHONUNBUFFERED="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    os.environ.update({k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_URL")})
    procs = []
    try:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=open(work / "server.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(server)
        wait_healthy(f"{ui}/api")
        saec("deploy", "apply", env=env)
        worker = subprocess.Popen([sys.executable, "-m", "saec.cli", "deploy", "worker", "--pool", "cloud"],
                                  env=env, cwd=ROOT, stdout=open(work / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(worker)
        sets = [a for s in [*DRAW, f"store.root={work / 'store'}"] for a in ("--set", s)]
        saec("deploy", "run", "saec-pipeline/in-process", *sets, "--wait", env=env)
        pages = asyncio.run(find_pages("saec-pipeline"))
        top = pages["top"]
        shoot(browser, f"{ui}/runs", out / "1-runs.png")
        # the run's page opens on its logs; its timeline marks the summary artifact on this run
        shoot(browser, f"{ui}/runs/flow-run/{top.id}", out / "2-deployment-run.png")
        shoot(browser, f"{ui}/artifacts", out / "3-artifacts.png")
        for name, key, height in (("4-summary", "summary-", 1600), ("5-report", "mvtec-holdout-report-", 3200),
                                  ("6-results-table", "mvtec-holdout-metrics-", 900)):
            art = pages[key]
            if art is None:
                print(f"no artifact with key {key}*", flush=True)
                continue
            shoot(browser, f"{ui}/artifacts/artifact/{art.id}", out / f"{name}.png", height)
        shoot(browser, f"{ui}/work-pools", out / "7-work-pools.png")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
