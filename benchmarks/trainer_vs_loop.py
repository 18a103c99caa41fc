"""The cloud training loop against Hugging Face's Trainer: same model, same data, same recipe.

`train_vlm` (the project's loop) and `transformers.Trainer` fine-tune the embedded stand-in for
the same optimizer steps of the embedded recipe (`CloudTrainConfig.tiny`): the same trainable
parameters (`setup_trainable`, seeded alike), the same batches in the same order
(`prepare_batch` over the epoch's order and augmentation), the same answer-only loss
(`answer_loss`, through `compute_loss`), AdamW, cosine schedule with warm-up, clipping at 1.0.
Two differences are Trainer's own and stay: it keeps biases and norm weights out of the weight
decay, and its warm-up starts one step lower. Reported: images per second after two warm-up steps and each step's loss, side by side, and what
each writes to resume from.

    python benchmarks/trainer_vs_loop.py      # writes benchmarks/results/trainer_vs_loop.json
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

from embedded_data import embedded_sft  # benchmarks/embedded_data.py
from saec.env import configure_offline  # noqa: E402

configure_offline()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from saec.artifacts.store import read_table  # noqa: E402
from saec.standins import standin  # noqa: E402
from saec.tasks.cloud.augment import augment_plan  # noqa: E402
from saec.tasks.cloud.checkpoints import epoch_order, seed_all  # noqa: E402
from saec.tasks.cloud.config import CloudTrainConfig, ModelLoadConfig  # noqa: E402
from saec.tasks.cloud.models import load_vlm  # noqa: E402
from saec.tasks.cloud.sft_examples import answer_loss, balance_examples, build_examples, prepare_batch, read_sft  # noqa: E402
from saec.tasks.cloud.train import train_vlm  # noqa: E402
from saec.tasks.cloud.trainable import setup_trainable  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WARM_UP = 2


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def with_trainer(cfg: CloudTrainConfig, sft: Path, steps: int, out: Path) -> dict:
    """`steps` optimizer steps through transformers.Trainer; per-step loss and seconds."""
    seed_all(cfg.seed)  # as train_vlm does before loading, so the adapters start alike
    loaded = load_vlm(ModelLoadConfig(model=cfg.model, dtype="float32", device="cpu", quantization="none"))
    processor = loaded.processor
    processor.tokenizer.padding_side = "right"
    examples, _ = balance_examples(build_examples(read_sft(sft), processor), cfg)
    model = setup_trainable(loaded, cfg)
    base = loaded.base
    order = epoch_order(cfg.seed, 0, len(examples)).tolist()
    augs = augment_plan(cfg, 0, examples)

    def collate(indices: list[int]) -> dict:
        return prepare_batch(processor, loaded.family, [examples[i] for i in indices], cfg.resize,
                             [augs[i] for i in indices])

    class AnswerLossTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return answer_loss(base, inputs)[0]

        def _get_train_sampler(self, *args, **kwargs):  # the loop's epoch order, not Trainer's own shuffle
            return torch.utils.data.SequentialSampler(order)

    times: list[float] = []

    class StepClock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    warmup = int(np.ceil(cfg.warmup_ratio * steps))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, lr_scheduler_type="cosine", warmup_steps=warmup,
        max_steps=steps, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch", logging_steps=1, save_strategy="steps",
        save_steps=steps, report_to=[], use_cpu=True, dataloader_num_workers=0, seed=cfg.seed,
        remove_unused_columns=False, disable_tqdm=True)  # fmt: skip
    trainer = AnswerLossTrainer(model=model, args=args, train_dataset=order, data_collator=collate,
                                callbacks=[StepClock()])  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seconds = np.diff([start, *times])
    written = sorted(p.name for p in next(out.glob("checkpoint-*")).iterdir())
    return {"loss": losses, "step_seconds": seconds.tolist(), "checkpoint_files": written}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "trainer_vs_loop.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="saec-bench-trainer-"))
    try:
        sft = embedded_sft(work, args.threads)
        cfg = CloudTrainConfig.tiny(standin("qwen"), progress=False, max_steps=args.steps,
                                    checkpoint_every=args.steps)  # fmt: skip
        # the schedule of a run of exactly `steps` steps (Trainer's warm-up and decay span max_steps)
        loop = train_vlm(cfg, sft, None, work / "loop-work", work / "loop-out")
        log = read_table(work / "loop-out" / "train_log.parquet")
        ckpt = next((work / "loop-work" / "checkpoints").glob("step-*"))
        theirs = with_trainer(cfg, sft, args.steps, work / "trainer")
        ours_s = log.step_seconds.to_numpy()[WARM_UP:]
        theirs_s = np.asarray(theirs["step_seconds"])[WARM_UP:]
        images = cfg.batch_size * cfg.grad_accum
        ours_rate, theirs_rate = images * len(ours_s) / ours_s.sum(), images * len(theirs_s) / theirs_s.sum()
        record = {
            "benchmark": "trainer_vs_loop",
            "what": "the embedded recipe on the shipped tiny Qwen2.5-VL stand-in, the same steps through train_vlm and "
                    "through transformers.Trainer (same trainable parameters, batches, order, answer-only loss, "
                    "AdamW, cosine with warm-up, clipping); images per second after two warm-up steps",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "threads": args.threads,
            "steps": args.steps,
            "images_per_step": images,
            "images_per_s": {"train_vlm": round(ours_rate, 1), "trainer": round(theirs_rate, 1)},
            "train_vlm_over_trainer": round(ours_rate / theirs_rate, 3),
            "loss": {"train_vlm": [round(x, 5) for x in log.loss.tolist()],
                     "trainer": [round(x, 5) for x in theirs["loss"]]},
            "max_loss_difference": round(float(np.max(np.abs(log.loss.to_numpy() - np.asarray(theirs["loss"])))), 5),
            "resume_files": {"train_vlm": sorted(p.name for p in ckpt.iterdir()),
                             "trainer": theirs["checkpoint_files"]},
            "loop_summary": {k: loop[k] for k in ("steps", "examples", "train_seconds")},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("images_per_s", "train_vlm_over_trainer", "max_loss_difference")}))


if __name__ == "__main__":
    main()
