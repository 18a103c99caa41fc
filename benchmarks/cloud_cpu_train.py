"""Training throughput of the embedded tiny Qwen2.5-VL on the CPU: batches prepared inline
(what `train_vlm` does on a CPU) against batches prepared by prefetch threads (what it did
before, and still does ahead of a GPU).

Both variants run the same step (decode, resize, augment, processor; forward, answer-token
loss, backward, clip, AdamW) over the same micro-batches of the embedded default SFT data; only
the supply of batches differs. They alternate, best of `--repeats`. `train_vlm` itself is then
run for the same number of steps and its own step log gives a third figure.

    python benchmarks/cloud_cpu_train.py            # writes benchmarks/results/cloud_cpu_train.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from embedded_data import embedded_sft  # benchmarks/embedded_data.py
from saec.env import configure_offline

configure_offline()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from saec.artifacts.store import read_table  # noqa: E402
from saec.tasks.cloud.config import CloudTrainConfig, ModelLoadConfig, TinyModelConfig  # noqa: E402
from saec.tasks.cloud.models import load_vlm  # noqa: E402
from saec.tasks.cloud.tiny import build_tiny_qwen  # noqa: E402
from saec.tasks.cloud.augment import augment_plan  # noqa: E402
from saec.tasks.cloud.sft_examples import answer_loss, build_examples, prepare_batch, read_sft  # noqa: E402
from saec.tasks.cloud.train import prefetch as prefetched, train_vlm  # noqa: E402
from saec.tasks.cloud.trainable import setup_trainable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, loadavg  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_steps(cfg: CloudTrainConfig, sft: Path, steps: int, threads: int, prefetch: bool) -> float:
    """Images per second over `steps` optimizer steps from a fresh model (after 2 warm-up steps)."""
    torch.manual_seed(cfg.seed)
    loaded = load_vlm(ModelLoadConfig(model=cfg.model, dtype="float32", device="cpu", quantization="none"))
    processor = loaded.processor
    processor.tokenizer.padding_side = "right"
    examples = build_examples(read_sft(sft), processor)
    model = setup_trainable(loaded, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    augs = augment_plan(cfg, 0, examples)
    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    jobs = [order[i : i + cfg.batch_size].tolist() for i in range(0, (steps + 2) * cfg.batch_size, cfg.batch_size)]

    def make(idx: list[int]) -> dict:
        return prepare_batch(processor, loaded.family, [examples[i] for i in idx], cfg.resize, [augs[i] for i in idx])

    pool = ThreadPoolExecutor(threads)
    batches = prefetched(make, jobs, pool, threads + 1) if prefetch else map(make, jobs)
    model.train()
    t0 = None
    for k, batch in enumerate(batches):
        if k == 2:
            t0 = time.perf_counter()
        loss, _ = answer_loss(loaded.base, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    pool.shutdown()
    return steps * cfg.batch_size / seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads and prefetch threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "cloud_cpu_train.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="saec-bench-train-"))
    try:
        sft = embedded_sft(work, args.threads)
        model = build_tiny_qwen(work / "tiny", TinyModelConfig())
        # the from-scratch recipe this benchmark has always timed (112 px, output layer trained)
        cfg = CloudTrainConfig.tiny(model, progress=False, max_steps=args.steps, resize=112, train_output_layer=True)

        rates: dict[str, list[float]] = {"inline": [], "prefetch_threads": []}
        for _ in range(args.repeats):
            for name in rates:
                rates[name].append(round(run_steps(cfg, sft, args.steps, args.threads, name != "inline"), 1))
        summary = train_vlm(cfg, sft, None, work / "work", work / "out")
        log = read_table(work / "out" / "train_log.parquet")
        timed = log.iloc[2:]  # after two warm-up steps, as run_steps times; none left for --steps 2 or fewer
        train_vlm_rate = float(timed.images.sum() / timed.step_seconds.sum()) if len(timed) else None

        best = {k: max(v) for k, v in rates.items()}
        record = {
            "benchmark": "cloud_cpu_train",
            "what": "optimizer steps of the embedded tiny Qwen2.5-VL (batch 8, 112 px, float32) on the CPU, "
                    "images per second: batches prepared inline against batches prepared by prefetch threads",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_start": loadavg()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__},
            "threads": args.threads,
            "steps": args.steps,
            "repeats": args.repeats,
            "examples": summary["examples"],
            "images_per_s": rates,
            "best_images_per_s": best,
            "inline_over_prefetch": round(best["inline"] / best["prefetch_threads"], 2),
            "train_vlm_images_per_s": None if train_vlm_rate is None else round(train_vlm_rate, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("best_images_per_s", "inline_over_prefetch", "train_vlm_images_per_s")}))


if __name__ == "__main__":
    main()
