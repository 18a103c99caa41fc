"""Cloud scoring on several devices at once: one process per device, shards merged in order.

A model of 7B parameters fills a GPU's compute on its own, so several GPUs of one host score
fastest as independent copies: each process loads the model on its device and scores one
contiguous shard of the manifest, and the parent concatenates the shards' tables in manifest
order. Processes start with `spawn` (CUDA cannot follow a fork) and each uses its share of the
CPU cores for decoding. The compile caches on disk (`$SAEC_HOME`) are shared, so only the first
process of a machine pays for compilation.
"""
from __future__ import annotations

import multiprocessing
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from saec.tasks.cloud.config import CloudScoreConfig

__all__ = ["resolve_devices", "score_manifest_sharded", "shard_bounds"]


def resolve_devices(cfg: CloudScoreConfig) -> list[str]:
    """The devices `cfg` scores on: `devices` as listed, every visible GPU for "all", else `device`."""
    if cfg.devices is None:
        return [cfg.device]
    if cfg.devices == "all":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or [cfg.device]
    return list(cfg.devices)


def shard_bounds(n: int, k: int, batch: int = 1) -> list[tuple[int, int]]:
    """[lo, hi) of k contiguous shards of n rows, cut at multiples of `batch` (so every batch is the one
    a single process would form, and so is every score), as even as that allows; empty shards dropped."""
    batches = -(-n // batch)
    edges = [min(n, int(round(batches * i / k)) * batch) for i in range(k + 1)]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _score_shard(cfg_json: str, manifest_path: str, lo: int, hi: int, out_path: str) -> dict:
    import pandas as pd

    from saec.env import configure_offline
    from saec.tasks.cloud.engine import VLMScorer

    configure_offline()
    cfg = CloudScoreConfig.model_validate_json(cfg_json)
    manifest = pd.read_parquet(manifest_path).iloc[lo:hi].reset_index(drop=True)
    return VLMScorer(cfg).score_manifest(manifest, out_path)


def score_manifest_sharded(cfg: CloudScoreConfig, manifest, out_path: str | Path) -> dict:
    """Score `manifest` on every device of `cfg` (one process each) into the `cloud_scores` table.

    With one device, or fewer than two rows, it scores in this process. Returns the table's
    summary like `VLMScorer.score_manifest`, with `seconds` the slowest shard's scoring time and
    one entry per shard (device, rows, seconds).
    """
    import pandas as pd

    from saec.artifacts.store import read_table, write_table
    from saec.env import available_cores
    from saec.tasks.cloud.engine import VLMScorer

    devices = resolve_devices(cfg)
    bounds = shard_bounds(len(manifest), len(devices), cfg.batch_size)
    if len(bounds) < 2:
        one = cfg.model_copy(update={"device": devices[0], "devices": None})
        return VLMScorer(one).score_manifest(manifest, out_path) | {"devices": devices[:1]}
    out_path = Path(out_path)
    tmp = Path(tempfile.mkdtemp(prefix=".shards-", dir=out_path.parent))
    try:
        manifest_path = tmp / "manifest.parquet"
        manifest.reset_index(drop=True).to_parquet(manifest_path)
        threads = max(1, available_cores() // len(bounds))
        jobs = []
        with ProcessPoolExecutor(len(bounds), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            for i, (lo, hi) in enumerate(bounds):
                shard_cfg = cfg.model_copy(update={"device": devices[i], "devices": None,
                                                   "decode_workers": max(1, min(cfg.decode_workers, threads))})
                jobs.append(pool.submit(_score_shard, shard_cfg.model_dump_json(), str(manifest_path), lo, hi,
                                        str(tmp / f"shard-{i}.parquet")))
            infos = [job.result() for job in jobs]
        table = pd.concat([read_table(tmp / f"shard-{i}.parquet") for i in range(len(bounds))], ignore_index=True)
        ref = write_table(table, "cloud_scores", out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = max(info["seconds"] for info in infos)
    first = infos[0]
    return {
        "path": ref.path, "sha256": ref.sha256, "rows": len(table), "explain_threshold": infos[0]["explain_threshold"],
        "seconds": seconds, "images_per_s": len(table) / seconds if seconds > 0 else None,
        "model_id": first["model_id"], "adapter_id": first["adapter_id"], "family": first["family"],
        "explanations_invalid": sum(info["explanations_invalid"] for info in infos),
        "devices": [devices[i] for i in range(len(bounds))],
        "shards": [{"device": devices[i], "rows": hi - lo, "seconds": info["seconds"]}
                   for i, ((lo, hi), info) in enumerate(zip(bounds, infos))],
    }  # fmt: skip
