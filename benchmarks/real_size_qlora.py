"""The production cloud path at real size, without the flow: a saved Qwen2.5-VL-7B folder loaded in
NF4 by `load_vlm`, QLoRA training by `train_vlm` with the published run's recipe, the adapter saved, loaded
again and scored by `VLMScorer`.

The model folder is written here: Qwen2.5-VL-7B-Instruct's real config, tokenizer, processor and
chat template with random bf16 weights, saved as safetensors shards. The images are 1024 x 1024
PNG files (MVTec AD's size) of noise, labelled alternately; accuracies are chance, the point is
that the code runs at real size and what it costs:

    python benchmarks/real_size_qlora.py --models DIR    # DIR holds Qwen2.5-VL-7B-Instruct (weightless)

Writes benchmarks/results/real_size_qlora_<device>.json: seconds per step of the path, the
load's quantised and unquantised modules, training images/s and peak GPU memory, the adapter's
files, the scores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from saec.env import configure_offline  # noqa: E402

configure_offline()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps of training (batch 2 x 8 accumulation)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    from PIL import Image

    from saec.prompts import chat_messages
    from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig, ModelLoadConfig
    from saec.tasks.cloud.engine import VLMScorer
    from random_vlm import build_random_vlm  # benchmarks/random_vlm.py
    from saec.tasks.cloud.models import load_vlm
    from saec.tasks.cloud.train import train_vlm

    work = Path(tempfile.mkdtemp(prefix="real-size-"))
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "device": torch.cuda.get_device_name(0),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "python": platform.python_version()}, "steps": {}}  # fmt: skip

    def step(name: str, t0: float, **extra) -> None:
        result["steps"][name] = {"seconds": round(time.perf_counter() - t0, 1), **extra}
        print(name, result["steps"][name], flush=True)

    weightless = Path(args.models) / "Qwen2.5-VL-7B-Instruct"
    folder = work / "Qwen2.5-VL-7B-random"
    t = time.perf_counter()
    loaded = build_random_vlm(weightless, device="cuda", dtype="bfloat16", seed=0)
    loaded.model.save_pretrained(folder, safe_serialization=True, max_shard_size="4GB")
    loaded.processor.save_pretrained(folder)
    for f in weightless.iterdir():  # chat template and tokenizer files as published
        if f.is_file() and not (folder / f.name).exists() and f.suffix in (".json", ".txt", ".jinja"):
            shutil.copy2(f, folder / f.name)
    del loaded
    torch.cuda.empty_cache()
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    step("write_model_folder", t, gb=round(size / 1e9, 2), shards=len(list(folder.glob("*.safetensors"))))

    rng = np.random.default_rng(0)
    images = work / "images"
    images.mkdir()
    rows = []
    for i in range(args.images):
        path = images / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(path, compress_level=1)
        rows.append({"image_id": f"{i:064x}", "image": str(path), "label": i % 2, "category": "noise",
                     "defect_type": "good" if i % 2 == 0 else "noise", "messages": chat_messages(str(path), i % 2)})  # fmt: skip
    sft = work / "sft_train.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))

    t = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    nf4 = load_vlm(ModelLoadConfig(model=str(folder), quantization="auto", device="cuda", dtype="bfloat16"))
    kinds: dict[str, int] = {}
    for name, module in nf4.model.named_modules():
        kind = type(module).__name__
        if kind in ("Linear4bit", "Linear"):
            where = "visual" if ".visual." in f".{name}." or name.startswith("model.visual") else "language"
            kinds[f"{where}:{kind}"] = kinds.get(f"{where}:{kind}", 0) + 1
    step("load_nf4", t, quantization=nf4.quantization, modules=kinds,
         gpu_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2))  # fmt: skip
    del nf4
    torch.cuda.empty_cache()

    t = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    cfg = CloudTrainConfig(model=str(folder), epochs=1, max_steps=args.steps, progress=False)
    summary = train_vlm(cfg, sft, None, work / "train-work", work / "train-out")
    adapter = work / "train-out" / "adapter"
    step("train_qlora", t, recipe={k: getattr(cfg, k) for k in ("batch_size", "grad_accum", "lr", "lora_r", "trainable",
                                                                  "quantization", "gradient_checkpointing", "resize")},
         steps=summary["steps"], examples=summary["examples"], train_seconds=round(summary["train_seconds"], 1),
         images_per_s=round(summary["steps"] * cfg.batch_size * cfg.grad_accum / summary["train_seconds"], 2),
         final_loss=summary["final_loss"], trainable_parameters=summary["trainable_parameters"],
         quantization=summary["quantization"], peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
         adapter_files=sorted(p.name for p in adapter.iterdir()),
         adapter_mb=round(sum(p.stat().st_size for p in adapter.iterdir()) / 2**20, 1))  # fmt: skip
    torch.cuda.empty_cache()

    t = time.perf_counter()
    scorer = VLMScorer(CloudScoreConfig(model=str(folder), adapter=str(adapter), progress=False))
    step("load_adapter_for_scoring", t, quantization=scorer.loaded.quantization)
    files = [r["image"] for r in rows]
    t = time.perf_counter()
    out = scorer.score(files)
    torch.cuda.synchronize()
    step("score", t, images=len(files), images_per_s=round(len(files) / (time.perf_counter() - t), 1),
         p_defect_range=[round(float(np.min(out["p_defect"])), 4), round(float(np.max(out["p_defect"])), 4)])
    name = "real_size_qlora_" + torch.cuda.get_device_name(0).split()[-1].lower() + ".json"
    target = args.out or Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")) / name
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
