"""Cloud scoring spread over processes (`cloud.score.devices`) on the GPUs of this machine.

Writes a Qwen2.5-VL-7B-Instruct folder (published config and tokenizer, random bf16 weights) and
1024 x 1024 PNG files, then scores the same files with the engine's defaults in this process
(the baseline) and through `score_manifest_sharded` on the device lists given, and records
images/s, each shard's time and the largest difference in P(defect) from the baseline:

    python benchmarks/sharded_scoring.py --models DIR --lists cuda:0 cuda:0,cuda:0 cuda:0,cuda:1

On one GPU, two processes share it: the point there is that the sharded path runs on CUDA and
agrees with the baseline; scaling is measured where several GPUs are lent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_pipeline import import_saec, versions, write_vlm  # noqa: E402  (benchmarks/gpu_pipeline.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--lists", nargs="+", default=["cuda:0", "cuda:0,cuda:0"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import_saec()
    from saec.env import configure_offline

    configure_offline()
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from saec.artifacts.store import read_table
    from saec.tasks.cloud.config import CloudScoreConfig
    from saec.tasks.cloud.engine import VLMScorer
    from saec.tasks.cloud.parallel import score_manifest_sharded

    work = Path(tempfile.mkdtemp(prefix="sharded-"))
    folder = work / "Qwen2.5-VL-7B-Instruct"
    result = {"benchmark": "sharded_scoring", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "cpu_cores": os.cpu_count(),
              "versions": versions(), "images": args.images, "image_px": 1024, "runs": []}
    result["write_model"] = write_vlm(args.models / folder.name, folder, "cuda", "bfloat16", None)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(args.images):
        p = work / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(p, compress_level=1)
        paths.append(str(p))
    manifest = pd.DataFrame({"image_id": [f"{i:04d}" for i in range(len(paths))], "path": paths})
    cfg = CloudScoreConfig(model=str(folder), progress=False)  # SAEC's defaults: 512 px, batch 24, compiled

    t = time.perf_counter()
    info = VLMScorer(cfg).score_manifest(manifest, work / "base.parquet")
    base = read_table(work / "base.parquet")
    result["runs"].append({"devices": "this process", "wall_s": round(time.perf_counter() - t, 2),
                           "scoring_s": round(info["seconds"], 2), "images_per_s_scoring": round(info["images_per_s"], 1)})
    torch.cuda.empty_cache()
    for spec in args.lists:
        devices = tuple(spec.split(","))
        t = time.perf_counter()
        info = score_manifest_sharded(cfg.model_copy(update={"devices": devices}), manifest, work / "s.parquet")
        table = read_table(work / "s.parquet")
        result["runs"].append({
            "devices": list(devices), "wall_s": round(time.perf_counter() - t, 2), "scoring_s": round(info["seconds"], 2),
            "images_per_s_scoring": round(info["images_per_s"], 1), "shards": info.get("shards"),
            "same_order": table.image_id.tolist() == base.image_id.tolist(),
            "max_abs_p_defect_diff": float(np.abs(table.p_defect.to_numpy() - base.p_defect.to_numpy()).max())})
        print(json.dumps(result["runs"][-1]), flush=True)
    name = "sharded_scoring_" + torch.cuda.get_device_name(0).split()[1].lower() + ".json"
    target = args.out or Path(os.environ.get("OUT") or Path(__file__).parent / "results") / name
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
