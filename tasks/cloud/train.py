"""Supervised fine-tuning of the cloud model (QLoRA as in the SAEC scripts), resumable.

`train_vlm` reads the SFT JSONL, renders each conversation with the model's own chat
template and trains on the answer tokens only (everything before the assistant's answer is
masked out of the loss). Every `checkpoint_every` optimizer steps it writes a checkpoint into
`work_dir/checkpoints/`: the trainable weights, optimizer, scheduler, random states, position
in the data order and the step log. A process killed at any point resumes from the last
complete checkpoint when `train_vlm` is called again with the same work_dir; the rows of the
step log after that checkpoint are dropped and training continues exactly where it stood.

The pieces live beside it: the examples, batches and answer-only loss in `sft_examples`, the
augmentation in `augment`, what learns in `trainable`, checkpoints and resume in `checkpoints`.
The loop is the project's own rather than Hugging Face's Trainer; `benchmarks/trainer_vs_loop.py`
runs both on the same model and batches and records the comparison.

Run as a module for a separate process:
    python -m saec.tasks.cloud.train --config cfg.json --train sft_train.jsonl --work W --out O
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig, ModelLoadConfig
from saec.tasks.cloud.models import (
    ADAPTER_RECORD,
    LoadedVLM,
    adapter_identity,
    load_vlm,
    lora_target_regex,
)
from saec.tasks.cloud.augment import augment_plan, check_augment
from saec.tasks.cloud.checkpoints import (
    CHECKPOINTS,
    LOG_NAME,
    TrainState,
    WeightAverage,
    checkpoint_dirs,
    epoch_order,
    run_fingerprint,
    load_checkpoint,
    save_checkpoint,
    seed_all,
)
from saec.tasks.cloud.sft_examples import ExplainTurn, SFTRow, answer_loss, balance_examples, build_examples, prepare_batch, read_sft
from saec.tasks.cloud.trainable import setup_trainable
from saec.tasks.metrics import classification_metrics


def _lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def prefetch(fn, jobs: list, pool: ThreadPoolExecutor, depth: int) -> Iterator[Any]:
    """fn(job) for each job, in order, computed up to `depth` jobs ahead in `pool`'s threads."""
    pending: deque[Future] = deque()
    it = iter(jobs)
    try:
        for job in it:
            pending.append(pool.submit(fn, job))
            if len(pending) >= depth:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result
    finally:
        for fut in pending:
            fut.cancel()
        for fut in pending:
            if not fut.cancelled():
                fut.exception()


@dataclass
class StepWindow:
    """The micro-batches of one optimizer step: `passes` passes of images (the last window of an
    epoch may be shorter), each pass's loss weighted by 1 / the window's length, and the step's
    statistics for the log."""

    passes: int
    n_micro: int
    losses: list[float] = field(default_factory=list)
    images: int = 0
    answer_tokens: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def _start(self, k: int) -> int:
        return (k // self.passes) * self.passes

    def length(self, k: int) -> int:
        """Micro-batches in the window that micro-batch k belongs to."""
        return min(self.passes, self.n_micro - self._start(k))

    def closes_at(self, k: int) -> bool:
        return k + 1 - self._start(k) >= self.length(k)

    def add(self, loss: float, batch: dict, answer_tokens: int) -> None:
        self.losses.append(loss)
        self.images += int(batch["input_ids"].shape[0])
        self.answer_tokens += answer_tokens
        self.tokens += int(batch["attention_mask"].sum())

    def log_row(self, state: TrainState, lr: float, grad_norm: float | None) -> dict:
        dt = time.perf_counter() - self.started
        return {"step": state.step, "epoch": state.last_epoch, "loss": float(np.mean(self.losses)), "lr": lr,
                "grad_norm": grad_norm, "images": self.images, "answer_tokens": self.answer_tokens,
                "tokens": self.tokens, "images_per_s": self.images / dt, "tokens_per_s": self.tokens / dt,
                "step_seconds": dt, "elapsed_s": state.elapsed_s, "session": state.session}


def _on_device(batch: dict, device, dtype) -> dict:
    moved = {key: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for key, v in batch.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


def _optimizer_step(named: list, optimizer, scheduler, max_grad_norm: float | None) -> tuple[float, float | None]:
    """Clip, step, advance the schedule, clear the gradients; returns (the step's lr, the gradient norm)."""
    import torch

    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in named], max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


def train_vlm(cfg: CloudTrainConfig, train_jsonl: Path, val_jsonl: Path | None, work_dir: Path, out_dir: Path) -> dict:
    """Fine-tune the cloud model; resumes from work_dir's last checkpoint; writes out_dir/adapter (or model).

    Returns a summary: paths written, steps, losses, timing, identities, validation metrics.
    """
    import torch
    from tqdm.auto import tqdm

    train_jsonl, work_dir, out_dir = Path(train_jsonl), Path(work_dir), Path(out_dir)
    rows = read_sft(train_jsonl)
    val_rows = read_sft(Path(val_jsonl)) if val_jsonl else None
    work_dir.mkdir(parents=True, exist_ok=True)

    seed_all(cfg.seed)
    load_cfg = ModelLoadConfig(
        model=cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        attn_implementation=cfg.attn_implementation,
        quantization=cfg.quantization,
    )
    loaded = load_vlm(load_cfg)
    if loaded.quantization == "nf4" and cfg.trainable == "full":
        raise ValueError("trainable='full' cannot train 4-bit weights: use quantization='none'")
    processor = loaded.processor
    processor.tokenizer.padding_side = "right"
    examples, classes = balance_examples(build_examples(rows, processor), cfg)
    augmented = check_augment(cfg, examples)
    explained = sum(ex.explain is not None for ex in examples) if cfg.explain_turn else 0
    if cfg.explain_turn and not explained:
        warnings.warn(f"explain_turn teaches nothing: no example of {train_jsonl} has an explanation target "
                      "(the SFT stage writes them for defect images with ground-truth masks)", stacklevel=2)
    fast_path = None
    if loaded.device.type == "cuda" and loaded.family == "qwen2_5_vl":
        # the scoring engine's uncompiled vision path (batched windows, patch embedding as one matmul);
        # the frozen tower's forward is the same computation, only without a Python loop per window
        from saec.tasks.cloud.fast import install_fast_path

        fast_path = install_fast_path(loaded.model)["installed"]
    model = setup_trainable(loaded, cfg)
    loaded.model = model
    base = loaded.base
    device = loaded.device
    per_pass, passes = cfg.passes(device.type)
    autocast = device.type == "cuda" and loaded.dtype != torch.float32

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for _, p in named)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        [p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    n_micro = math.ceil(len(examples) / per_pass)
    steps_per_epoch = math.ceil(n_micro / passes)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_lr_lambda, warmup=warmup, total=total_steps, kind=cfg.lr_scheduler)
    )

    average = WeightAverage(named, cfg.ema_decay) if cfg.ema_decay is not None else None
    fingerprint = run_fingerprint(cfg, train_jsonl, loaded.model_id) | {"images_per_pass": per_pass}
    state, log_rows = TrainState(), []
    for stale in (work_dir / CHECKPOINTS).glob(".tmp-step-*"):  # a checkpoint cut off mid-write
        shutil.rmtree(stale, ignore_errors=True)
    ckpts = checkpoint_dirs(work_dir / CHECKPOINTS)
    resumed_from = None
    if ckpts:
        state, log_rows = load_checkpoint(ckpts[-1], model, optimizer, scheduler, fingerprint, average)
        state.session += 1
        resumed_from = state.step

    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc="cloud training", unit="step",
               disable=not cfg.progress, dynamic_ncols=True)
    t_session = time.perf_counter()
    elapsed_at_start = state.elapsed_s

    def elapsed() -> float:
        return elapsed_at_start + time.perf_counter() - t_session

    explain = ExplainTurn(processor) if cfg.explain_turn else None

    def make(job: tuple[list, list[int]]) -> dict:
        augs, idx = job
        return prepare_batch(processor, loaded.family, [examples[i] for i in idx], cfg.resize, [augs[i] for i in idx],
                             explain)

    last_ckpt_step = state.step if resumed_from is not None else -1
    pool = ThreadPoolExecutor(cfg.preprocess_workers, thread_name_prefix="saec-train-data")
    try:
        while state.step < total_steps and state.epoch < cfg.epochs:
            order = epoch_order(cfg.seed, state.epoch, len(examples))
            augs = augment_plan(cfg, state.epoch, examples)
            micro = [(augs, order[i : i + per_pass].tolist()) for i in range(0, len(order), per_pass)]
            start = state.next_micro
            if device.type == "cpu":
                # Prefetch threads overlap data preparation with a GPU's work; on a CPU they take cores
                # from the intra-op threads and slow every step (benchmarks/cloud_cpu_train.py: 1.47x on 2 cores).
                batches = map(make, micro[start:])
            else:
                batches = prefetch(make, micro[start:], pool, cfg.preprocess_workers + 1)
            window = StepWindow(passes, n_micro)
            for k, batch in enumerate(batches, start=start):
                batch = _on_device(batch, device, loaded.dtype)
                with torch.autocast(device.type, dtype=loaded.dtype, enabled=autocast):
                    loss, n_tok = answer_loss(base, batch)
                (loss / window.length(k)).backward()
                window.add(float(loss.detach()), batch, n_tok)
                if not window.closes_at(k):
                    continue
                lr, grad_norm = _optimizer_step(named, optimizer, scheduler, cfg.max_grad_norm)
                state.stepped(k, n_micro)
                if average is not None:
                    average.update(state.step)
                state.elapsed_s = elapsed()
                log_rows.append(window.log_row(state, lr, grad_norm))
                bar.update(1)
                bar.set_postfix(loss=f"{log_rows[-1]['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{log_rows[-1]['images_per_s']:.1f}")
                done = state.step >= total_steps
                if state.step % cfg.checkpoint_every == 0 or done:
                    save_checkpoint(work_dir, state, model, optimizer, scheduler, log_rows, fingerprint,
                                    cfg.keep_checkpoints, cfg.seed, len(examples), average)
                    last_ckpt_step = state.step
                window = StepWindow(passes, n_micro)
                if done:
                    break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    if last_ckpt_step != state.step:  # e.g. resumed at the end: make the final state durable too
        save_checkpoint(work_dir, state, model, optimizer, scheduler, log_rows, fingerprint,
                        cfg.keep_checkpoints, cfg.seed, len(examples), average)

    model.eval()
    if average is not None:  # the checkpoints keep the last step's weights; the outputs get the average
        average.copy_to_model()
    written = _write_outputs(model, loaded, cfg, out_dir, work_dir)
    summary = {
        **written,
        "steps": state.step,
        "total_steps": total_steps,
        "epochs_done": state.epoch,
        "examples": len(examples),
        "class_counts": classes["class_counts"],
        "trained_on": classes["trained_on"],
        "augmented_examples": augmented,
        "explained_examples": explained,
        "resumed_from_step": resumed_from,
        "sessions": state.session + 1,
        "train_seconds": state.elapsed_s,
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "images_per_pass": per_pass,
        "passes_per_step": passes,
        "vision_fast_path": fast_path,
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "quantization": loaded.quantization,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(device),
        "model_id": loaded.model_id,
        "config": cfg.model_dump(mode="json"),
    }
    if val_rows is not None:
        summary["val"] = evaluate(loaded, cfg, val_rows)
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _write_outputs(model, loaded: LoadedVLM, cfg: CloudTrainConfig, out_dir: Path, work_dir: Path) -> dict:
    """out_dir/adapter (PEFT, loadable with PeftModel.from_pretrained) or out_dir/model; the step log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Saved modules go back to the model's dtype (they trained in float32).
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" not in name and p.dtype != loaded.dtype:
            p.data = p.data.to(loaded.dtype)
    result: dict[str, Any] = {}
    if cfg.trainable == "full":
        target = out_dir / "model"
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target, safe_serialization=True)
        for f in loaded.model_dir.iterdir():  # processor, tokenizer, chat template: as the base has them
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in {
                "config.json", "model.safetensors.index.json", "generation_config.json"
            }:
                shutil.copy2(f, target / f.name)
        result["model_dir"] = str(target)
        result["adapter_dir"] = None
        result["adapter_id"] = None
    else:
        target = out_dir / "adapter"
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target)
        record = {
            "base_model_id": loaded.model_id,
            "base_model_dir": str(loaded.model_dir),
            "family": loaded.family,
            "trainable": cfg.trainable,
            "lora_target_modules": lora_target_regex(cfg.lora_mlp),
            "train_config": cfg.model_dump(mode="json"),
        }
        (target / ADAPTER_RECORD).write_text(json.dumps(record, indent=2))
        result["adapter_dir"] = str(target)
        result["adapter_id"] = adapter_identity(target)
        result["model_dir"] = str(loaded.model_dir)
    shutil.copy2(work_dir / LOG_NAME, out_dir / LOG_NAME)
    result["train_log"] = str(out_dir / LOG_NAME)
    return result


def evaluate(loaded: LoadedVLM, cfg: CloudTrainConfig, rows: list[SFTRow]) -> dict:
    """Accuracy of the trained model on SFT rows, through the scoring engine (P(defect) >= 0.5)."""
    from saec.tasks.cloud.engine import VLMScorer

    score_cfg = CloudScoreConfig(
        model=str(loaded.model_dir),
        resize=cfg.resize,
        batch_size=cfg.eval_batch_size,
        threshold=0.5,
        impl="fast",
        progress=cfg.progress,
    )
    scorer = VLMScorer(score_cfg, loaded=loaded, merge_adapter=False)
    scores = scorer.score([r.image for r in rows])
    decisions = pd.DataFrame({"label": [r.label for r in rows], "pred": scores["pred"], "score": scores["p_defect"],
                              "branch": "cloud"})
    metrics = classification_metrics(decisions)
    del metrics["cloud_share"]
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune the cloud model (resumable).")
    parser.add_argument("--config", required=True, help="JSON file of CloudTrainConfig fields")
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--val", type=Path, default=None)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    from saec.env import configure_offline

    configure_offline()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CloudTrainConfig.model_validate_json(Path(args.config).read_text())
    summary = train_vlm(cfg, args.train, args.val, args.work, args.out)
    print(json.dumps({k: summary[k] for k in ("steps", "resumed_from_step", "sessions", "final_loss", "adapter_dir")}))


if __name__ == "__main__":
    main()
