"""Cloud throughput on one GPU: scoring (files -> P(defect)) and the QLoRA training step.

Real architectures from the weightless model folders (config, tokenizer, processor, chat
template) with random bf16 weights; synthetic PNG files on disk; everything measured in one
run on one machine:

  scoring, Qwen2.5-VL-7B, at 448 and 512 px, per batch size:
    plain    the published run's way: decode + resize + processor in the loop, then the plain Hugging Face
             forward (full-vocabulary logits), P(defect) from the two label columns;
    fast     `VLMScorer` (threaded decode, prefetched batches, two output rows only) with the
             uncompiled fast path (batched vision windows, patch embedding as one matmul,
             broadcast rotary ids), the processor preparing every batch;
    fast+compile  the engine's defaults: compiled vision blocks and decoder layers (the last
             layer at the scored position only), token ids built once per image size and
             uint8 pixels normalised and cut into patches on the GPU.
    Per row: images/s end to end, FLOPs per image (counted on the real shapes), fraction of the
    physical limit (FLOPs/image over the matmul rate), peak GPU memory; and for one batch size
    the split of the time: CPU preparation alone, GPU forward alone, vision tower alone,
    language model alone, device-side input preparation alone.
  P(defect) max |fast - plain| on the same files.
  LLaVA-1.5-7B through the same engine.
  training, Qwen2.5-VL-7B, 448 px: a plain Hugging Face LoRA loop (bf16 base, labels loss,
    gradient checkpointing) against the project's QLoRA step (NF4 base, `setup_trainable`,
    `answer_loss`, prefetched data, fast path), images/s and peak memory.

    python benchmarks/cloud_gpu.py                    # on the GPU machine
    python benchmarks/cloud_gpu.py --smoke            # reduced depth/width, few images, CPU: a code check

Writes benchmarks/results/cloud_h200.json (after every section) and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from saec.env import configure_offline  # noqa: E402

configure_offline()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from saec.prompts import chat_messages  # noqa: E402
from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig  # noqa: E402
from saec.tasks.cloud.engine import VLMScorer  # noqa: E402
from saec.tasks.cloud.forward import (  # noqa: E402
    add_mm_token_type_ids,
    build_prompt_spec,
    forward_kwargs,
    label_logits_fast,
    to_device,
)
from random_vlm import build_random_vlm  # noqa: E402  (benchmarks/random_vlm.py)
from saec.tasks.cloud.fast import install_fast_path  # noqa: E402
from saec.tasks.cloud.images import load_rgb  # noqa: E402

MATMUL_TFLOPS = 786.0  # a bf16 8192^3 matmul measured on one H200; re-measured below on CUDA
SMOKE_TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6})
SMOKE_VISION = dict(depth=2, fullatt_block_indexes=[1], out_hidden_size=256, hidden_size=320,
                    intermediate_size=856, num_heads=4)
SMOKE_LLAVA_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=4)
# what --smoke scores and trains: a few images, one small batch each, no compilation
SMOKE_ARGS = dict(sizes="448", batches="4", plain_batches="4", llava_batches="4", compile_batches="4",
                  variants="fast", breakdown_batch=4, images=8, plain_images=8, source_px=256, reps=1,
                  train_batches="2:0,2:1", train_plain_batch=2, train_steps=2)
SMOKE_LLAVA_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


# --------------------------------------------------------------------------- utilities


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def measured_matmul_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    sync(device)
    return round(2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12, 1)


def make_images(folder: Path, n: int, side: int, seed: int = 0) -> list[str]:
    """Textured RGB PNGs (smooth pattern + noise, like a part under light), written in parallel."""
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> str:
        rng = np.random.default_rng([seed, i])
        yy, xx = np.mgrid[0:side, 0:side] / side
        base = 120 + 60 * np.sin(2 * np.pi * (xx * rng.uniform(1, 4) + yy * rng.uniform(1, 4)))
        arr = base[..., None] + rng.normal(0, 12, (side, side, 3))
        p = folder / f"img_{i:05d}.png"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p)
        return str(p)

    with ThreadPoolExecutor(min(16, os.cpu_count() or 2)) as pool:
        return list(pool.map(one, range(n)))


def flops_per_image(fn, n_images: int) -> float:
    """FLOPs of `fn` per image, counted by torch's FLOP counter on the real shapes.

    Grouped-query attention is counted at its full head count (sharing key/value heads saves
    memory, not arithmetic): the counter's attention formula needs equal head counts, so keys
    and values are expanded while counting.
    """
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    sdpa = F.scaled_dot_product_attention

    def expanded(q, k, v, *args, enable_gqa: bool = False, **kwargs):
        if k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        return sdpa(q, k, v, *args, **kwargs)

    counter = FlopCounterMode(display=False)
    F.scaled_dot_product_attention = expanded
    try:
        with counter, torch.inference_mode():
            fn()
    finally:
        F.scaled_dot_product_attention = sdpa
    return counter.get_total_flops() / n_images


class Results:
    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {**meta, "scoring": [], "scoring_breakdown": [], "numerics": [], "llava": [], "training": [],
                     "errors": []}

    def add(self, key: str, row: dict) -> None:
        self.data[key].append(row)
        self.write()
        print(json.dumps(row, default=str), flush=True)

    def error(self, section: str, exc: BaseException) -> None:
        self.data["errors"].append({"section": section, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc()[-3000:]})
        self.write()
        print(f"!! {section}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- scoring


def plain_score(loaded, spec, paths: list[str], batch_size: int, resize: int) -> np.ndarray:
    """The published run's loop: decode, processor, plain forward with full logits; P(defect) per image."""
    proc, model, device = loaded.processor, loaded.model, loaded.device
    proc.tokenizer.padding_side = "left"
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            images = [load_rgb(p, resize) for p in paths[i : i + batch_size]]
            enc = dict(proc(text=[spec.prefix] * len(images), images=images, return_tensors="pt", padding=True))
            add_mm_token_type_ids(enc, loaded.family, getattr(proc, "image_token_id", None))
            enc = to_device(enc, device, loaded.dtype)
            logits = model(**forward_kwargs(enc), use_cache=False).logits[:, -1, list(spec.label_ids)].float()
            out.append(torch.softmax(logits, dim=-1)[:, 1].cpu().numpy())
    return np.concatenate(out)


VARIANTS = {  # CloudScoreConfig options of the engine's variants
    "fast": dict(compile_vision=False, compile_language=False, prepare_on_device=False),
    "fast+compile": dict(compile_vision=True, compile_language=True, prepare_on_device=True),
    "engine": {},  # the engine's defaults (for LLaVA, which has no fast path)
}


def engine_scorer(loaded, folder: Path, batch_size: int, resize: int, workers: int, variant: str = "fast",
                  ) -> VLMScorer:
    cfg = CloudScoreConfig(model=str(folder), impl="fast", resize=resize, batch_size=batch_size, progress=False,
                           decode_workers=workers, prefetch_batches=3, **VARIANTS[variant])
    return VLMScorer(cfg, loaded=loaded)


def fast_path_summary(record: dict | None) -> dict | None:
    """The JSON-friendly part of an installed fast path's record."""
    if record is None:
        return None
    out = {k: record[k] for k in ("family", "installed", "skipped", "options", "vision_mlp_width") if k in record}
    out["stats"] = dict(record.get("stats") or {})
    if "language" in record:
        out["language_calls"] = {k: record["language"][k] for k in ("fast_calls", "library_calls")}
    return out


def timed(fn, n_images: int, device) -> tuple[float, float, object]:
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    dt = time.perf_counter() - t
    return n_images / dt, dt, result


def score_rows(res: Results, loaded, folder: Path, paths: dict[int, list[str]], sizes, batches, variant: str,
               flops: dict, args, n_warm: int) -> dict:
    """images/s end to end for one variant over sizes x batch sizes; returns P(defect) per (size, batch)."""
    device = loaded.device
    spec = build_prompt_spec(loaded.processor)
    ps = {}
    for size in sizes:
        for bs in batches:
            n_files = args.plain_images if variant == "plain" else args.images
            files = paths[size][: max(n_files, 2 * bs)]
            try:
                reset_peak(device)
                extra = {}
                if variant == "plain":
                    plain_score(loaded, spec, files[: bs * n_warm], bs, size)  # warm-up
                    ips, dt, p = timed(lambda: plain_score(loaded, spec, files, bs, size), len(files), device)
                else:
                    scorer = engine_scorer(loaded, folder, bs, size, args.workers, variant)
                    scorer.score(files[: bs * n_warm])  # warm-up (and compilation, where compiled)
                    ips, dt, out = timed(lambda: scorer.score(files), len(files), device)
                    p = out["p_defect"]
                    firsts = np.unique(out["batch_index"], return_index=True)[1]
                    extra = {"wait_for_prepared_batches_s": round(float(out["wait_seconds"][firsts].sum()), 3),
                             "first_batch_wait_s": round(float(out["wait_seconds"][0]), 3)}
                    scorer.close()
                ps[(size, bs)] = p
                fl = flops.get(size)
                res.add("scoring", {
                    "model": loaded.model_dir.name, "variant": variant, "image_px": size, "batch": bs,
                    "images": len(files), "seconds": round(dt, 3), "images_per_s": round(ips, 2),
                    "flops_per_image_T": round(fl / 1e12, 3) if fl else None,
                    "fraction_of_limit": round(ips * fl / (args.matmul_tflops * 1e12), 3) if fl else None,
                    "physical_limit_images_per_s": round(args.matmul_tflops * 1e12 / fl, 1) if fl else None,
                    "peak_gb": peak_gb(device), **extra,
                })
            except torch.cuda.OutOfMemoryError as exc:
                res.error(f"scoring {variant} {size}px batch {bs}", exc)
                reset_peak(device)
    return ps


def breakdown(res: Results, loaded, folder: Path, files: list[str], size: int, bs: int, variant: str, args) -> None:
    """Where the time goes at one batch size: CPU preparation alone (decode threads, and the
    processor where it is used), the GPU forward alone on one prepared batch, and within it the
    vision tower and the language model; the device-side input preparation (copy, patches)."""
    from saec.tasks.cloud.forward import last_real_index
    from saec.tasks.cloud.fast import keep_positions

    device = loaded.device
    scorer = engine_scorer(loaded, folder, bs, size, args.workers, variant)
    try:
        files = files[: max(args.images, 2 * bs)]
        t = time.perf_counter()
        n = sum(len(p.paths) for p in scorer._batches(files))
        prep_ips = n / (time.perf_counter() - t)
        prepared = next(iter(scorer._batches(files[:bs])))
        with torch.inference_mode():
            batch = scorer.device_batch(prepared.batch)
            dev_ips, _, _ = timed(lambda: [scorer.device_batch(prepared.batch) for _ in range(args.reps)],
                                  bs * args.reps, device)
            base = scorer._base
            label_logits_fast(base, batch, scorer._label_rows)
            gpu_ips, _, _ = timed(lambda: [label_logits_fast(base, batch, scorer._label_rows)
                                           for _ in range(args.reps)], bs * args.reps, device)
            inner = base.model
            visual = inner.visual
            pv, grid = batch["pixel_values"], batch["image_grid_thw"]
            feats = visual(pv, grid_thw=grid)
            vis_ips, _, _ = timed(lambda: [visual(pv, grid_thw=grid) for _ in range(args.reps)], bs * args.reps, device)
            # the language model alone: embeddings with the image features in place, 3-D positions
            feats = getattr(feats, "pooler_output", feats)
            ids = batch["input_ids"]
            embeds = inner.get_input_embeddings()(ids)
            image_rows = (ids == loaded.processor.image_token_id)[..., None]
            embeds = embeds.masked_scatter(image_rows, feats.to(embeds.dtype))
            pos, _ = inner.get_rope_index(ids, image_grid_thw=grid, attention_mask=batch["attention_mask"],
                                          mm_token_type_ids=batch["mm_token_type_ids"])
            last = last_real_index(batch["attention_mask"])[:, None]

            def language() -> None:
                with keep_positions(base, last):
                    inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                         position_ids=pos, use_cache=False)

            language()
            lm_ips, _, _ = timed(lambda: [language() for _ in range(args.reps)], bs * args.reps, device)
        res.add("scoring_breakdown", {
            "variant": variant, "image_px": size, "batch": bs,
            "prompt_tokens": int(ids.shape[1]),
            "visual_tokens": int((ids[0] == loaded.processor.image_token_id).sum()),
            "patches_per_image": int(pv.shape[0] // bs),
            "cpu_prepare_images_per_s": round(prep_ips, 1),
            "device_prepare_images_per_s": round(dev_ips, 1),
            "gpu_forward_images_per_s": round(gpu_ips, 1),
            "gpu_forward_ms_per_image": round(1e3 / gpu_ips, 2),
            "vision_tower_images_per_s": round(vis_ips, 1),
            "vision_ms_per_image": round(1e3 / vis_ips, 2),
            "language_model_images_per_s": round(lm_ips, 1),
            "language_ms_per_image": round(1e3 / lm_ips, 2),
            "vision_share_of_gpu_time": round(gpu_ips / vis_ips, 3),
            "inputs_prepared_on_device": "pixels_uint8" in prepared.batch,
        })
    finally:
        scorer.close()


def section_qwen_scoring(res: Results, args, folder: Path, paths) -> None:
    loaded = build_random_vlm(folder, device=args.device, dtype=args.dtype, seed=0,
                              text_overrides=SMOKE_TEXT if args.smoke else None,
                              vision_overrides=SMOKE_VISION if args.smoke else None)
    device = loaded.device
    spec = build_prompt_spec(loaded.processor)
    loaded.processor.tokenizer.padding_side = "left"
    # FLOPs per image from the real shapes, before anything is installed: the work that must be
    # done (vision + every decoder position + two output rows), and the plain forward's
    # (full-vocabulary logits at every position).
    flops_min, flops_plain = {}, {}
    head = loaded.model.get_output_embeddings()
    rows = torch.nn.Linear(head.in_features, 2, bias=False, device=device, dtype=torch.float32)
    for size in args.sizes:
        images = [load_rgb(p, size) for p in paths[size][:2]]
        batch = to_device(dict(add_mm_token_type_ids(
            dict(loaded.processor(text=[spec.prefix] * 2, images=images, return_tensors="pt", padding=True)),
            loaded.family, loaded.processor.image_token_id)), device, loaded.dtype)
        flops_min[size] = flops_per_image(lambda: label_logits_fast(loaded.model, batch, rows), 2)
        flops_plain[size] = flops_per_image(lambda: loaded.model(**forward_kwargs(batch), use_cache=False), 2)
        res.data.setdefault("flops", {})[f"qwen_{size}"] = {
            "needed_T": round(flops_min[size] / 1e12, 3), "plain_forward_T": round(flops_plain[size] / 1e12, 3),
            "prompt_tokens": int(batch["input_ids"].shape[1]), "physical_limit_images_per_s":
            round(args.matmul_tflops * 1e12 / flops_min[size], 1)}
    res.write()

    p_plain = score_rows(res, loaded, folder, paths, args.sizes, args.plain_batches, "plain", flops_min, args, 1)

    p = {}
    for variant in args.variants:
        t = time.perf_counter()
        try:
            batches = args.compile_batches if variant == "fast+compile" else args.batches
            p[variant] = score_rows(res, loaded, folder, paths, args.sizes, batches, variant, flops_min, args, 2)
            if variant == "fast+compile":
                res.data["compile_seconds_incl_first_runs"] = round(time.perf_counter() - t, 1)
            for key in sorted(set(p_plain) & set(p[variant])):
                m = min(len(p[variant][key]), len(p_plain[key]))  # the same files, in the same order
                d = np.abs(p[variant][key][:m] - p_plain[key][:m])
                res.add("numerics", {"variant": variant, "image_px": key[0], "batch": key[1], "images": int(len(d)),
                                     "p_defect_max_abs_diff_fast_vs_plain": float(d.max()),
                                     "p_defect_mean_abs_diff": float(d.mean()),
                                     "p_defect_range_plain": [float(p_plain[key].min()), float(p_plain[key].max())]})
            breakdown(res, loaded, folder, paths[args.sizes[0]], args.sizes[0], args.breakdown_batch, variant, args)
            record = getattr(loaded.model, "_saec_fast_path", None)
            res.data.setdefault("fast_path", {})[variant] = fast_path_summary(record)
            res.write()
        except Exception as exc:  # recorded in the results, the run goes on
            res.error(variant, exc)
            reset_peak(device)
    del loaded
    reset_peak(device)


def section_llava(res: Results, args, folder: Path, paths) -> None:
    loaded = build_random_vlm(folder, device=args.device, dtype=args.dtype, seed=0,
                              text_overrides=SMOKE_LLAVA_TEXT if args.smoke else None,
                              vision_overrides=SMOKE_LLAVA_VISION if args.smoke else None)
    record = install_fast_path(loaded.model)
    res.data["llava_fast_path"] = fast_path_summary(record)
    size = args.sizes[0]
    scorer = engine_scorer(loaded, folder, 2, size, 2)
    batch = scorer.device_batch(next(iter(scorer._batches(paths[size][:2]))).batch)
    fl = flops_per_image(lambda: label_logits_fast(scorer._base, batch, scorer._label_rows), 2)
    res.data.setdefault("flops", {})["llava"] = {"needed_T": round(fl / 1e12, 3),
                                                 "prompt_tokens": int(batch["input_ids"].shape[1])}
    scorer.close()
    p_plain = score_rows(res, loaded, folder, paths, [size], args.plain_batches[:1], "plain", {size: fl}, args, 1)
    p_fast = score_rows(res, loaded, folder, paths, [size], args.llava_batches, "engine", {size: fl}, args, 1)
    for key in sorted(set(p_plain) & set(p_fast)):
        res.add("numerics", {"model": "llava", "image_px": key[0], "batch": key[1],
                             "p_defect_max_abs_diff_fast_vs_plain":
                             float(np.abs(p_fast[key][: len(p_plain[key])] - p_plain[key][: len(p_fast[key])]).max())})
    for row in res.data["scoring"]:
        if row["model"] == folder.name:
            res.data["llava"].append(row)
    res.write()
    del loaded, scorer
    reset_peak(torch.device(args.device))


# --------------------------------------------------------------------------- training


def quantize_language_model_nf4(model, compute_dtype) -> int:
    """Replace the language model's linear layers by bitsandbytes NF4 (double-quantized) layers, in place.

    The same layers `models.nf4_config` quantizes at load: everything but the vision side and
    the output layer. Random weights are quantized from the bf16 values just drawn.
    """
    import bitsandbytes as bnb

    lm = model.model.language_model
    n = 0
    for name, module in list(lm.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                w = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                      quant_type="nf4", module=q)
                q.weight = w._quantize(child.weight.device) if child.weight.device.type != "cpu" else w.to("cpu")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q)
                n += 1
    model.is_loaded_in_4bit = True
    return n


def sft_examples(processor, paths: list[str]):
    from saec.tasks.cloud.sft_examples import SFTRow, build_examples

    rows = [SFTRow(image_id=str(i), image=p, label=i % 2, messages=chat_messages(p, i % 2))
            for i, p in enumerate(paths)]
    return build_examples(rows, processor)


def train_plain(res: Results, args, folder: Path, files: list[str], bs: int) -> None:
    """Plain Hugging Face LoRA loop: bf16 base, PEFT LoRA, labels loss over full logits, sequential data."""
    from peft import LoraConfig, get_peft_model

    from saec.tasks.cloud.models import VISION_MERGER, lora_target_regex
    from saec.tasks.cloud.sft_examples import prepare_batch

    loaded = build_random_vlm(folder, device=args.device, dtype=args.dtype, seed=0,
                              text_overrides=SMOKE_TEXT if args.smoke else None,
                              vision_overrides=SMOKE_VISION if args.smoke else None)
    device = loaded.device
    model = loaded.model
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none",
                                             target_modules=lora_target_regex(False),
                                             modules_to_save=[VISION_MERGER[loaded.family]]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    processor = loaded.processor
    processor.tokenizer.padding_side = "right"
    examples = sft_examples(processor, files)

    def step(i: int) -> None:
        exs = [examples[(i * bs + j) % len(examples)] for j in range(bs)]
        batch = prepare_batch(processor, loaded.family, exs, args.train_size)
        labels = batch["input_ids"].masked_fill(~batch.pop("answer_mask"), -100)
        batch = to_device(batch, device, loaded.dtype)
        out = model(**forward_kwargs(batch), labels=labels.to(device), use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    step(0)
    ips, dt, _ = timed(lambda: [step(i) for i in range(1, args.train_steps + 1)], bs * args.train_steps, device)
    res.add("training", {"variant": "plain_hf_lora_bf16", "image_px": args.train_size, "batch": bs,
                         "steps": args.train_steps, "seconds": round(dt, 2), "images_per_s": round(ips, 2),
                         "peak_gb": peak_gb(device), "gradient_checkpointing": True})
    del loaded, model, opt
    reset_peak(device)


def train_ours(res: Results, args, folder: Path, files: list[str], variants: list[tuple[int, bool]]) -> None:
    """The project's QLoRA step: NF4 base, `setup_trainable`, `answer_loss`, prefetched data, fast path."""
    from saec.tasks.cloud.sft_examples import answer_loss, prepare_batch
    from saec.tasks.cloud.train import prefetch
    from saec.tasks.cloud.trainable import setup_trainable

    loaded = build_random_vlm(folder, device=args.device, dtype=args.dtype, seed=0,
                              text_overrides=SMOKE_TEXT if args.smoke else None,
                              vision_overrides=SMOKE_VISION if args.smoke else None)
    device = loaded.device
    n4 = quantize_language_model_nf4(loaded.model, loaded.dtype)
    loaded.quantization = "nf4"
    reset_peak(device)
    res.data["training_nf4_linear_layers"] = n4
    record = install_fast_path(loaded.model)
    res.data["training_fast_path"] = record["installed"]
    processor = loaded.processor
    processor.tokenizer.padding_side = "right"
    examples = sft_examples(processor, files)
    base_model = loaded.model
    done_setup = False
    for bs, checkpointing in variants:
        try:
            cfg = CloudTrainConfig(model=str(folder), batch_size=bs, quantization="nf4", dtype=args.dtype,
                                   device=args.device, gradient_checkpointing=checkpointing, progress=False)
            if not done_setup:
                loaded.model = setup_trainable(loaded, cfg)
                done_setup = True
            model = loaded.model
            base = loaded.base
            enable = getattr(base, "activation_checkpointing_enable", None)
            disable = getattr(base, "activation_checkpointing_disable", None)
            if checkpointing:
                kwargs = {"use_reentrant": False}
                if enable is not None:
                    enable(activation_checkpointing_kwargs=kwargs)
                else:
                    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                (disable or base.gradient_checkpointing_disable)()
            from saec.tasks.cloud.trainable import drop_input_grad_hooks

            drop_input_grad_hooks(model)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=2e-4, fused=device.type == "cuda")
            autocast = device.type == "cuda"
            pool = ThreadPoolExecutor(args.workers, thread_name_prefix="bench-train")

            def make(i: int) -> dict:
                exs = [examples[(i * bs + j) % len(examples)] for j in range(bs)]
                return prepare_batch(processor, loaded.family, exs, args.train_size)

            def run(first: int, n: int) -> None:
                for batch in prefetch(make, list(range(first, first + n)), pool, args.workers + 1):
                    batch = {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}
                    batch["pixel_values"] = batch["pixel_values"].to(loaded.dtype)
                    with torch.autocast(device.type, dtype=loaded.dtype, enabled=autocast):
                        loss, _ = answer_loss(base, batch)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            reset_peak(device)
            run(0, 1)
            ips, dt, _ = timed(lambda: run(1, args.train_steps), bs * args.train_steps, device)
            pool.shutdown()
            res.add("training", {"variant": "qlora_nf4_fast", "image_px": args.train_size, "batch": bs,
                                 "steps": args.train_steps, "seconds": round(dt, 2), "images_per_s": round(ips, 2),
                                 "peak_gb": peak_gb(device), "gradient_checkpointing": checkpointing,
                                 "trainable_parameters": int(sum(p.numel() for p in params))})
            del opt
        except torch.cuda.OutOfMemoryError as exc:
            res.error(f"training qlora batch {bs} checkpointing={checkpointing}", exc)
        reset_peak(device)
    del loaded, base_model
    reset_peak(device)


# --------------------------------------------------------------------------- main


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda}
    for name in ("peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # recorded, a missing package shows in the results
            out[name] = f"unavailable: {type(exc).__name__}"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=None, help="folder holding the two weightless model folders")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cloud_h200.json")
    ap.add_argument("--sections", default="score,train,llava", help="run in this order")
    ap.add_argument("--sizes", default="448,512")
    ap.add_argument("--batches", default="32", help="batch sizes of the uncompiled fast variant")
    ap.add_argument("--plain-batches", default="32")
    ap.add_argument("--llava-batches", default="32,64")
    ap.add_argument("--breakdown-batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=512, help="files scored per engine measurement (at least 2 batches)")
    ap.add_argument("--plain-images", type=int, default=256, help="files scored per plain measurement")
    ap.add_argument("--source-px", type=int, default=640, help="side of the synthetic PNG files")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 2))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default="fast,fast+compile", help="engine variants measured after the plain one")
    ap.add_argument("--compile-batches", default="16,32,64")
    ap.add_argument("--train-size", type=int, default=448)
    ap.add_argument("--train-plain-batch", type=int, default=16)
    ap.add_argument("--train-batches", default="16:0,32:0,16:1", help="batch:checkpointing pairs for QLoRA")
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="reduced depth and width on the CPU (a code check)")
    args = ap.parse_args(argv)
    if args.smoke:  # small counts too, so the check takes seconds; flags given explicitly still win
        ap.set_defaults(**SMOKE_ARGS)
        args = ap.parse_args(argv)

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.batches = [int(s) for s in args.batches.split(",")]
    args.plain_batches = [int(s) for s in args.plain_batches.split(",")]
    args.llava_batches = [int(s) for s in args.llava_batches.split(",")]
    args.compile_batches = [int(s) for s in args.compile_batches.split(",")]
    args.variants = args.variants.split(",")
    if set(args.variants) - {"fast", "fast+compile"}:
        raise SystemExit("--variants: choose from fast, fast+compile")
    train_variants = [(int(a), b == "1") for a, b in (x.split(":") for x in args.train_batches.split(","))]
    if args.smoke:
        torch.set_num_threads(2)
    models = args.models or (Path(os.environ["SAEC_MODELS_DIR"]) if os.environ.get("SAEC_MODELS_DIR") else None)
    if models is None or not (Path(models) / "Qwen2.5-VL-7B-Instruct" / "config.json").is_file():
        raise SystemExit("no model folders: pass --models or set SAEC_MODELS_DIR (a folder holding "
                         "Qwen2.5-VL-7B-Instruct and llava-1.5-7b-hf)")
    device = torch.device(args.device)
    measured = measured_matmul_tflops(device)
    args.matmul_tflops = measured or MATMUL_TFLOPS
    meta = {
        "benchmark": "cloud_gpu", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_cores": os.cpu_count(), "versions": versions(), "smoke": args.smoke,
        "matmul_tflops_measured": measured, "matmul_tflops_used_for_limit": args.matmul_tflops,
        "weights": "random, real architecture from config.json", "dtype": args.dtype,
        "args": {k: v for k, v in vars(args).items() if k not in {"out", "models"}},
    }
    res = Results(args.out, meta)
    sections = args.sections.split(",")
    unknown = set(sections) - {"score", "llava", "train"}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}: choose from score, llava, train")
    with tempfile.TemporaryDirectory(prefix="saec-cloud-bench-") as tmp:
        n_files = max(args.images, args.plain_images,
                      2 * max(args.batches + args.compile_batches + args.plain_batches + args.llava_batches))
        files = make_images(Path(tmp) / "imgs", n_files, args.source_px)
        paths = {s: files for s in args.sizes}
        jobs = dict((
            ("score", lambda: section_qwen_scoring(res, args, models / "Qwen2.5-VL-7B-Instruct", paths)),
            ("llava", lambda: section_llava(res, args, models / "llava-1.5-7b-hf", paths)),
            ("train", lambda: (train_ours(res, args, models / "Qwen2.5-VL-7B-Instruct", files, train_variants),
                               train_plain(res, args, models / "Qwen2.5-VL-7B-Instruct", files,
                                           args.train_plain_batch))),
        ))
        for name in sections:
            t = time.perf_counter()
            try:
                jobs[name]()
            except Exception as exc:  # recorded in the JSON; the other sections still run
                res.error(name, exc)
                reset_peak(device)
            res.data.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
            res.write()
    print_table(res.data)


def print_table(data: dict) -> None:
    print("\nmodel / variant / px / batch : images/s  fraction-of-limit  peak GB")
    for r in data["scoring"]:
        print(f"{r['model'][:22]:22s} {r['variant']:13s} {r['image_px']:4d} {r['batch']:3d} : "
              f"{r['images_per_s']:8.2f}  {r['fraction_of_limit']}  {r['peak_gb']}")
    for r in data["scoring_breakdown"]:
        print("breakdown", r)
    for r in data["numerics"]:
        print("numerics", r)
    for r in data["training"]:
        print(f"train {r['variant']:20s} batch {r['batch']:3d} ckpt={r['gradient_checkpointing']!s:5s}: "
              f"{r['images_per_s']:7.2f} images/s  peak {r['peak_gb']} GB")
    for e in data["errors"]:
        print("ERROR", e["section"], e["error"])


if __name__ == "__main__":
    main()
