"""The distributed mode's costs on one machine: the object store against a local store for a whole
embedded run, and the edge stage's throughput on one and on two edge workers.

    python benchmarks/distributed.py                   # both parts (about 20 min on 2 cores)
    python benchmarks/distributed.py --skip-store      # the edge part only (runs its own preparation)

Part 1, store: `saec run` on the embedded default twice, in fresh stores and fresh homes, one
after the other in this run: store.root a local folder (the baseline), then an S3 bucket on a
real S3 API server on loopback (moto's, in memory). Both measure the command's whole wall time.
The object store's figure holds what it adds on the client (hashing and uploading every output,
verifying the records) and the server's handling; there is no network between them.

Part 2, edge: a Prefect server on PostgreSQL and two edge workers (`--limit 1`, homes of their
own), the store in the bucket. The parent (this process) sends SAEC's edge stage on the embedded
holdout (1,000 images) through the same placement as `saec run --distributed`, as 1 shard (one
worker) and as 2 shards (both workers), alternating; each measurement first removes the stage's
records from the store so that it computes. Reported: wall time from sending to the merged table,
images/s, and the stage runs' own build time (the rest is dispatch: pick-up, process start,
fetching inputs). The first round, which fills each worker's caches (images, ONNX graph), is
reported apart.

Writes benchmarks/results/distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
from machine import cpu_model, loadavg  # noqa: E402
from servers import PostgresServer, PrefectServer, S3Server  # noqa: E402

RESULTS = HERE / "results"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {n: md.version(n) for n in ("prefect", "s3fs", "moto", "fsspec", "onnxruntime", "torch", "ultralytics")}


def _home_env(base: dict[str, str], home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {**base, "HOME": str(home), "SAEC_HOME": str(home / "saec"), "PREFECT_HOME": str(home / "prefect"),
            "XDG_CACHE_HOME": str(home / "cache")}  # fmt: skip


OVERRIDES: list[str] = []  # --set, for every run


def _saec_run(env: dict[str, str], cwd: Path, *overrides: str) -> float:
    overrides = (*OVERRIDES, *overrides)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-P", "-m", "saec.cli", "run", *(f"--set={o}" for o in overrides)], cwd=cwd,
                          env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"saec run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def _bucket_size(s3: S3Server, prefix: str) -> dict[str, int]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.ACCESS_KEY,
                          aws_secret_access_key=s3.SECRET_KEY, region_name=s3.REGION)  # fmt: skip
    objects = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            objects += 1
            size += obj["Size"]
    return {"objects": objects, "bytes": size}


def store_part(s3: S3Server, work: Path, base: dict[str, str]) -> dict:
    print("part 1: a whole embedded run on a local store, then on the object store", flush=True)
    local = _saec_run(_home_env(base, work / "local-home"), work, f"store.root={work / 'local-store'}")
    print(f"  local store: {local:.1f} s", flush=True)
    remote = _saec_run(_home_env(base | s3.env(), work / "s3-home"), work, f"store.root=s3://{s3.bucket}/embedded")
    print(f"  object store: {remote:.1f} s", flush=True)
    return {"local_store_s": round(local, 2), "object_store_s": round(remote, 2), "ratio": round(remote / local, 3),
            "object_store_held": _bucket_size(s3, "embedded/")}  # fmt: skip


def _stage_inputs(url: str):
    """The embedded run's holdout, SFT split and trained edge model, from its run record in the store."""
    from saec.artifacts.store import Store
    from saec.config import load_config

    store = Store(url)
    runs = [r for r in store.runs() if r.flow == "pipeline" and r.record.get("status") == "completed"]
    record = max(runs, key=lambda r: r.record["started"]).record

    def result(name: str):
        entry = record["stages"][name]
        found = store.lookup(Path(entry["dir"]).parent.name, entry["key"])
        assert found is not None, f"{name} is not in {url}"
        return found

    cfg = load_config(None, [*OVERRIDES, f"store.root={url}"])
    return dict(store=url, images=result("holdout"), table="manifest", trained=result("train_edge"), sft=result("sft"),
                cfg=cfg.edge, telemetry=cfg.telemetry)  # fmt: skip


def _measure(url: str, rounds: int) -> dict:
    from prefect import flow

    from saec.artifacts.store import Store
    from saec.flows.common import execute_stage, placed
    from saec.flows.remote import RemoteConfig, RemoteStages
    from saec.tasks.edge.task import predict_edge_task
    from saec.tasks.stage import Shard, stage_of

    params = _stage_inputs(url)

    n = len(params["images"].table("manifest"))
    decl = stage_of(predict_edge_task)
    store = Store(url)

    @flow(name="benchmark-edge-shards")
    def measure(shards: int, label: str) -> dict:
        p = params | {"label": label}
        keys = [decl.key(p)] if shards == 1 else [decl.key(p | {"shard": Shard(index=i, count=shards)}) for i in range(shards)]
        for key in keys:  # computed, not taken from the store
            store.remote.delete(f"stages/{decl.name}/{key}/_stage.json")
        stages = RemoteStages(RemoteConfig(edge_shards=shards, poll_interval_s=0.5, start_timeout_s=300))
        t0 = time.perf_counter()
        with placed(stages):
            execute_stage(predict_edge_task, p)
        wall = time.perf_counter() - t0
        stages.close()
        builds = [store.lookup(decl.name, key).build_s for key in keys]
        workers = sorted({Path(s["mirror"]).parts[-4] for s in stages.dispatched})
        return {"shards": shards, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 1),
                "stage_build_s": [round(b or 0.0, 2) for b in builds], "workers": workers}  # fmt: skip

    print(f"part 2: edge stage on {n} images, 1 shard vs 2 shards on two edge workers", flush=True)
    warm = [measure(1, "warm-1"), measure(2, "warm-2")]  # fills both workers' caches
    for m in warm:
        print(f"  first round, {m['shards']} shard(s): {m['wall_s']} s", flush=True)
    timed = []
    for r in range(rounds):
        for shards in (1, 2):
            m = measure(shards, f"round{r}-{shards}")
            timed.append(m)
            print(f"  {shards} shard(s): {m['wall_s']} s, {m['images_per_s']} images/s, builds {m['stage_build_s']}, "
                  f"on {m['workers']}", flush=True)  # fmt: skip
    one = min(m["wall_s"] for m in timed if m["shards"] == 1)
    two = min(m["wall_s"] for m in timed if m["shards"] == 2)
    return {"images": n, "first_round": warm, "measurements": timed, "best_1_worker_s": one, "best_2_workers_s": two,
            "speedup_2_over_1": round(one / two, 3)}  # fmt: skip


def edge_part(s3: S3Server, work: Path, base: dict[str, str], rounds: int, prepare: bool) -> dict:
    url = f"s3://{s3.bucket}/embedded"
    if prepare:
        print("part 2: preparing the embedded run in the object store", flush=True)
        _saec_run(_home_env(base | s3.env(), work / "s3-home"), work, f"store.root={url}")
    procs = []
    with PostgresServer(work / "pg") as pg:
        server = PrefectServer(work / "server", pg.url).start()
        try:
            env = {k: v for k, v in server.env().items() if k not in ("PREFECT_HOME", "PREFECT_API_DATABASE_CONNECTION_URL")}
            env.update(s3.env(), PREFECT_WORKER_QUERY_SECONDS="1")
            subprocess.run([sys.executable, "-P", "-m", "saec.cli", "deploy", "apply"], cwd=ROOT, check=True,
                           env=_home_env(env, work / "operator"), capture_output=True)  # fmt: skip
            for name in ("edge-a", "edge-b"):
                wenv = _home_env(env, work / name)
                log = open(work / name / "worker.log", "w")
                procs.append(subprocess.Popen([sys.executable, "-P", "-m", "prefect", "worker", "start", "--pool", "edge",
                                               "--type", "process", "--limit", "1", "--name", name], cwd=work / name,
                                              env=wenv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
            os.environ.update(_home_env(env, work / "parent"))  # the store's client and this machine's mirror
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                return _measure(url, rounds)
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/saec-bench-distributed"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-store", action="store_true", help="leave out part 1 (part 2 then prepares its own inputs)")
    ap.add_argument("--out", type=Path, default=RESULTS / "distributed.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a configuration override for every run (a smaller try)")
    args = ap.parse_args()
    OVERRIDES.extend(args.overrides)
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "SAEC_"))}
    base.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    result = {
        "benchmark": "distributed",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "loadavg_start": loadavg()},
        "versions": _versions(),
        "overrides": args.overrides,
    }
    with S3Server(log=args.work / "moto.log") as s3:
        if not args.skip_store:
            result["store"] = store_part(s3, args.work, base)
        result["edge"] = edge_part(s3, args.work, base, args.rounds, prepare=args.skip_store)
    result["machine"]["loadavg_end"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
