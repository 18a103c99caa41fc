"""Compilation paid once: the time from a loaded model to its first scored batch, in a fresh process
with an empty compile cache (cold) and in a second fresh process with the cache the first filled (warm).

Every stage and every nightly run is a fresh process, and the engine compiles its vision blocks
and decoder layers with torch.compile. Its caches (Inductor's compiled graphs, Triton's kernels)
are files: `saec.env.configure_offline` points them at `$SAEC_HOME/torchinductor` and
`$SAEC_HOME/triton`, so a later process on the same machine finds them. This benchmark runs the
engine's defaults (fast path, compiled, inputs made on the GPU) on Qwen2.5-VL-7B's real
architecture with random bf16 weights, twice, each time in a new interpreter with SAEC_HOME set
to one folder that starts empty:

    python benchmarks/compile_cache.py --models DIR     # DIR holds Qwen2.5-VL-7B-Instruct (config, tokenizer)

Per process: seconds to build the model, seconds from the model built to the first batch scored
(compilation included), and images/s over the files afterwards. Writes
benchmarks/results/compile_cache_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """One fresh process: build, compile and score; print one JSON line."""
    t0 = time.perf_counter()
    from saec.env import configure_offline

    configure_offline()
    import torch

    from saec.tasks.cloud.config import CloudScoreConfig
    from saec.tasks.cloud.engine import VLMScorer
    from random_vlm import build_random_vlm  # benchmarks/random_vlm.py

    t_import = time.perf_counter()
    folder = Path(args.models) / "Qwen2.5-VL-7B-Instruct"
    loaded = build_random_vlm(folder, device="cuda", dtype="bfloat16", seed=0)
    torch.cuda.synchronize()
    t_built = time.perf_counter()
    cfg = CloudScoreConfig(model=str(folder), resize=args.size, batch_size=args.batch, progress=False)
    scorer = VLMScorer(cfg, loaded=loaded)
    files = sorted(str(p) for p in Path(args.image_dir).glob("*.png"))
    scorer.score(files[: args.batch])
    torch.cuda.synchronize()
    t_first = time.perf_counter()
    out = scorer.score(files)
    torch.cuda.synchronize()
    t_all = time.perf_counter()
    cache = Path(os.environ["SAEC_HOME"])
    print("RESULT " + json.dumps({
        "import_s": round(t_import - t0, 2), "build_model_s": round(t_built - t_import, 2),
        "model_built_to_first_batch_s": round(t_first - t_built, 2),
        "images": len(files), "images_per_s_after": round(len(files) / (t_all - t_first), 1),
        "p_defect_first": float(out["p_defect"][0]),
        "cache_files": sum(1 for p in cache.rglob("*") if p.is_file()),
        "cache_mb": round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20, 1),
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="folder holding Qwen2.5-VL-7B-Instruct (config, tokenizer, processor)")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import numpy as np
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="compile-cache-"))
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(images / f"{i:04d}.png", compress_level=1)
    runs = []
    for label in ("cold", "warm"):
        env = {**os.environ, "SAEC_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
        for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            env.pop(key, None)  # from SAEC_HOME, as configure_offline sets them
        t = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", "--models", args.models, "--size", str(args.size),
                               "--batch", str(args.batch), "--image-dir", str(images)], env=env, capture_output=True,
                              text=True)  # fmt: skip
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{label} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        runs.append({"run": label, "process_s": round(time.perf_counter() - t, 1), **json.loads(line[7:])})
        print(runs[-1], flush=True)
    import torch
    import transformers

    result = {
        "what": "time from a loaded Qwen2.5-VL-7B (random bf16 weights) to its first scored batch, engine defaults, "
                "in a fresh process with an empty compile cache, then in another fresh process with that cache",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0), "cpu": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "image_px": args.size, "batch": args.batch, "files": args.images, "file_px": 1024, "runs": runs,
        "warm_over_cold_first_batch": round(runs[1]["model_built_to_first_batch_s"] / runs[0]["model_built_to_first_batch_s"], 3),
    }
    name = "compile_cache_" + torch.cuda.get_device_name(0).split()[-1].lower().replace(" ", "_") + ".json"
    out = args.out or Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")) / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
