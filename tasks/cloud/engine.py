"""The cloud scoring engine: P(defect) from a vision-language model, in batches.

P(defect) follows the SAEC run: the prompt is the chat template with the user turn (image +
instruction), the generation prompt, then the answer prefix `Label: `; one forward pass; the
next-token logits of the label strings "0" and "1" at the last real position of each row;
P(defect) = softmax over those two; defect iff P(defect) >= threshold.

Two implementations share everything but the forward pass:
  - "reference": the plain Hugging Face forward, which computes full-vocabulary logits at every
    position, then picks the two label columns at the last real position;
  - "fast": runs the decoder without its output layer, takes the last hidden state at the last
    real position of each row and multiplies it by the two label rows of the output layer only.
    With an adapter on unquantized weights, LoRA is merged into the base weights once at load.

Images are decoded and resized by a pool of threads while the previous batch computes. For the
fast implementation of Qwen2.5-VL with a fixed `resize`, every image has the same size, so the
token sequence (template, prompt, image pads, answer prefix) is the same for every image: it is
built once per size, and the decode threads write uint8 pixels into a pinned batch that is copied
to the device on a side stream and normalised and cut into patches there, exactly as the
processor does it (`images.PatchLayout`); the token tensors and 3-D positions are moved to the
device once per batch size. Otherwise the processor prepares each batch. Results are fetched one
batch late: the next batch is queued before the host waits for the current one's logits.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from saec.prompts import chat_messages
from saec.tasks.cloud.config import CloudScoreConfig
from saec.tasks.cloud.explain import (
    EXPLAIN_INSTRUCTION,
    STATUS_NOT_DEFECT,
    STATUS_NOT_REQUESTED,
    parse_explanation,
)
from saec.tasks.cloud.forward import (  # noqa: F401  (PromptError, build_prompt_spec, encode: part of the interface)
    IMAGE_PLACEHOLDER,
    PromptError,
    StaticPrompt,
    render_chat,
    answer_logprobs,
    build_prompt_spec,
    encode,
    forward_kwargs,
    label_logits_fast,
    label_logits_reference,
    last_real_index,
    to_device,
)
from saec.tasks.cloud.images import PatchLayout, dihedral_views, five_crops, load_rgb, patches_from_uint8
from saec.tasks.cloud.models import LoadedVLM, load_vlm

VIEWS = {"none": 1, "five_crop": 5, "dihedral": 8}  # images scored per input image, by `tta`


# --------------------------------------------------------------------------- the scorer


@dataclass
class _Prepared:
    index: int
    paths: list[str]
    batch: dict
    sizes: list[tuple[int, int]]  # (width, height) of each image as given to the processor
    prepare_seconds: float


class VLMScorer:
    """Batch scorer of P(defect) for Qwen2.5-VL (tiny or 7B, with or without adapter) and LLaVA-1.5."""

    def __init__(self, cfg: CloudScoreConfig, loaded: LoadedVLM | None = None, *, merge_adapter: bool = True):
        import torch

        self.cfg = cfg
        self._tta = cfg.tta  # the test-time augmentation of the call in progress (`score(tta=...)`)
        self._lock = threading.Lock()  # one `score` call at a time: the call's settings live on the scorer
        self.loaded = loaded if loaded is not None else load_vlm(cfg.load_config())
        if cfg.family is not None and cfg.family != self.loaded.family:
            raise ValueError(f"config expects a {cfg.family} model, {self.loaded.model_dir} is {self.loaded.family}")
        self.processor = self.loaded.processor
        self.processor.tokenizer.padding_side = "left"  # batched generation needs it; scoring handles both
        self.family = self.loaded.family
        self.device = self.loaded.device
        self.dtype = self.loaded.dtype
        self.spec = build_prompt_spec(self.processor)
        self.explain_prefix = explain_prompt(self.processor)
        self._take_model(merge_adapter)
        self.fast_path = self._install_fast_path()
        self._plan_static_prompts()
        self._static_device: dict[int, dict] = {}  # per batch size: token tensors and positions on the device
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._label_rows = self._label_head()
        self._pool_pair: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None

    # ---- set-up -------------------------------------------------------------------
    def _take_model(self, merge_adapter: bool) -> None:
        """The model to run: the adapter merged into unquantized weights for the fast path."""
        from peft import PeftModel

        model = self.loaded.model
        self.merged = False
        if self.cfg.impl == "fast" and merge_adapter and isinstance(model, PeftModel) \
                and self.loaded.quantization == "none":  # fmt: skip
            model = model.merge_and_unload()
            self.merged = True
        self.model = model.eval()
        self._base = model.get_base_model() if isinstance(model, PeftModel) else model
        if self.cfg.impl == "reference" and getattr(self._base, "_saec_fast_path", None) is not None:
            raise ValueError(
                "impl='reference' runs the library's forward, but this model carries the fast path that a "
                "fast scorer installed on it: load the model again for the reference scorer, or remove the "
                "fast path first (saec.tasks.cloud.fast.uninstall_fast_path)"
            )

    def _install_fast_path(self) -> dict | None:
        """On CUDA: batched vision-window attention, compiled vision blocks and compiled decoder
        layers (saec.tasks.cloud.fast); `impl="reference"` keeps the plain library forward. A model
        that carries the fast path with other options gets it again with this scorer's."""
        cfg = self.cfg
        if not (cfg.impl == "fast" and self.device.type == "cuda" and self.family == "qwen2_5_vl"):
            return None
        from saec.tasks.cloud.fast import install_fast_path, uninstall_fast_path

        options = {"compile_vision": cfg.compile_vision, "compile_language": cfg.compile_language,
                   "rope_broadcast": True}
        current = getattr(self._base, "_saec_fast_path", None)
        if current is not None and current.get("options") != options:
            uninstall_fast_path(self._base)
            current = None
        return current if current is not None else install_fast_path(self._base, **options)

    def _plan_static_prompts(self) -> None:
        """Same-size images: token tensors once per size, pixels prepared on the device."""
        cfg = self.cfg
        self._layout: PatchLayout | None = None
        self._static: StaticPrompt | None = None
        if cfg.impl == "fast" and cfg.prepare_on_device and cfg.resize is not None and self.family == "qwen2_5_vl":
            layout = PatchLayout.from_processor(self.processor)
            if layout is not None and layout.handles(cfg.resize, cfg.resize):
                self._layout = layout
                self._static = StaticPrompt(self.processor, self.family, self.spec.prefix,
                                            *layout.target_size(cfg.resize, cfg.resize))
                self._normalizer = layout.normalizer(self.device)

    def _label_head(self):
        """The output layer's rows of the two label tokens, as a float32 [2, hidden] linear layer."""
        import torch

        head = self._base.get_output_embeddings()
        rows = torch.nn.Linear(head.in_features, 2, bias=head.bias is not None, device=self.device)
        with torch.no_grad():
            rows.weight.copy_(head.weight[list(self.spec.label_ids)].float())
            if head.bias is not None:
                rows.bias.copy_(head.bias[list(self.spec.label_ids)].float())
        return rows.requires_grad_(False)

    # ---- identity -----------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def adapter_id(self) -> str | None:
        return self.loaded.adapter_id

    # ---- data ---------------------------------------------------------------------
    def _decode(self, path: str):
        tta = self._tta
        image = load_rgb(path, None if tta == "five_crop" else self.cfg.resize)
        if tta == "five_crop":
            return five_crops(image, self.cfg.resize or min(image.size))
        return dihedral_views(image) if tta == "dihedral" else [image]

    def _prepare(self, index: int, paths: list[str], pool: ThreadPoolExecutor) -> _Prepared:
        t0 = time.perf_counter()
        if self._static is not None:
            return self._prepare_static(index, paths, pool, t0)
        groups = list(pool.map(self._decode, paths))
        return self._prepare_processor(index, paths, groups, t0)

    def _prepare_processor(self, index: int, paths: list[str], groups: list, t0: float) -> _Prepared:
        images = [im for group in groups for im in group]
        texts = [self.spec.prefix] * len(images)
        batch = encode(self.processor, self.family, texts, images, pin=self.device.type == "cuda")
        sizes = [groups[i][0].size for i in range(len(paths))]
        return _Prepared(index, paths, batch, sizes, time.perf_counter() - t0)

    def _prepare_static(self, index: int, paths: list[str], pool: ThreadPoolExecutor, t0: float) -> _Prepared:
        """Decode threads write uint8 pixels (resized as the processor would) into one pinned batch."""
        import torch

        per_path = VIEWS[self._tta]
        height, width = self._static.size
        pixels = torch.empty((len(paths) * per_path, height, width, 3), dtype=torch.uint8,
                             pin_memory=self.device.type == "cuda")
        rows = pixels.numpy()
        side = self.cfg.resize

        def fill(i: int) -> tuple[list, bool]:
            group = self._decode(paths[i])
            for j, im in enumerate(group):
                if im.size != (side, side):
                    return group, False
                np.copyto(rows[i * per_path + j], self._layout.resize_like_processor(np.asarray(im)))
            return group, True

        done = list(pool.map(fill, range(len(paths))))
        groups = [g for g, _ in done]
        if not all(ok for _, ok in done):  # cannot happen with `resize` set; the processor handles it anyway
            return self._prepare_processor(index, paths, groups, t0)
        batch = {"pixels_uint8": pixels}  # the token tensors are on the device already (`_static_rows`)
        sizes = [g[0].size for g in groups]
        return _Prepared(index, paths, batch, sizes, time.perf_counter() - t0)

    def device_batch(self, batch: dict) -> dict:
        """A prepared batch on the device. Copies run on a side stream (CUDA). A same-size batch
        sends only its uint8 pixels: the token tensors and 3-D positions are moved once per batch
        size and reused (the same tensors every batch), the patches are made on the device."""
        static = "pixels_uint8" in batch
        moved = self._upload({"pixels_uint8": batch["pixels_uint8"]} if static else batch)
        if static:
            pixels = moved.pop("pixels_uint8")
            moved.update(self._static_rows(pixels.shape[0]))
            moved["pixel_values"] = patches_from_uint8(pixels, self._layout, self.dtype, self._normalizer)
        return moved

    def _upload(self, batch: dict) -> dict:
        import torch

        if self._copy_stream is None:
            return to_device(batch, self.device, self.dtype)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            moved = to_device(batch, self.device, self.dtype)
        compute.wait_stream(self._copy_stream)
        for v in moved.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(compute)
        return moved

    def _static_rows(self, n: int) -> dict:
        """Token tensors and 3-D positions of n same-size images on the device, made once per n."""
        if n not in self._static_device:
            rows = to_device(self._static.batch(n), self.device, self.dtype)
            positions = self._static_positions(rows)
            if positions is not None:
                rows["position_ids"] = positions
            self._static_device[n] = rows
        return dict(self._static_device[n])

    def _static_positions(self, batch: dict):
        """3-D rotary position ids of a same-size batch: the model's own `get_rope_index` of one
        row, repeated (None where the model has no such method)."""
        inner = getattr(self._base, "model", None)
        rope_index = getattr(inner, "get_rope_index", None)
        if rope_index is None:
            return None
        n = batch["input_ids"].shape[0]
        one = {k: batch[k][:1] for k in ("image_grid_thw", "attention_mask", "mm_token_type_ids") if k in batch}
        try:
            pos, _ = rope_index(batch["input_ids"][:1], **one)
        except TypeError:  # a library version without mm_token_type_ids
            one.pop("mm_token_type_ids", None)
            pos, _ = rope_index(batch["input_ids"][:1], **one)
        return pos.expand(pos.shape[0], n, pos.shape[2]).contiguous()

    def _batches(self, paths: Sequence[str]) -> Iterable[_Prepared]:
        """Prepared batches in order, `prefetch_batches` ahead of the consumer."""
        size = self.cfg.batch_size
        chunks = [list(paths[i : i + size]) for i in range(0, len(paths), size)]
        decode_pool, batch_pool = self._pools()
        pending: deque[Future] = deque()
        try:
            next_chunk = 0
            while next_chunk < len(chunks) and len(pending) < self.cfg.prefetch_batches:
                pending.append(batch_pool.submit(self._prepare, next_chunk, chunks[next_chunk], decode_pool))
                next_chunk += 1
            while pending:
                prepared = pending.popleft().result()
                if next_chunk < len(chunks):
                    pending.append(batch_pool.submit(self._prepare, next_chunk, chunks[next_chunk], decode_pool))
                    next_chunk += 1
                yield prepared
        finally:
            for fut in pending:
                fut.cancel()
            for fut in pending:  # let a running preparation finish before the pools are reused
                if not fut.cancelled():
                    fut.exception()

    def _pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        """Decode and batch threads, kept for the scorer's life (each batch thread owns a processor copy)."""
        if self._pool_pair is None:
            decode = ThreadPoolExecutor(self.cfg.decode_workers, thread_name_prefix="saec-decode")
            batch = ThreadPoolExecutor(self.cfg.prefetch_batches, thread_name_prefix="saec-batch")
            self._pool_pair = (decode, batch)
            self._finalizer = weakref.finalize(self, _shutdown_pools, decode, batch)
        return self._pool_pair

    def close(self) -> None:
        """Stop the scorer's worker threads (they also stop when the scorer is garbage-collected)."""
        if self._pool_pair is not None:
            self._finalizer()
            self._pool_pair = None

    # ---- compute ------------------------------------------------------------------
    def _logits(self, batch: dict):
        """[n, 2] label logits (or summed answer log-probs with TTA) for the rows of one batch."""
        fast = self.cfg.impl == "fast"
        if self._tta == "five_crop":
            return answer_logprobs(self._base if fast else self.model, batch, self.spec, fast)
        if fast:
            return label_logits_fast(self._base, batch, self._label_rows)
        return label_logits_reference(self.model, batch, self.spec.label_ids)

    def score(self, paths: Sequence[str | Path], tta: str | None = None) -> dict[str, np.ndarray]:
        """Score image files; returns per-image arrays (p_defect, pred, logits, batch timing, explanations).

        `tta` overrides the configured test-time augmentation for this call."""
        if tta is not None and tta not in VIEWS:
            raise ValueError(f"tta must be one of {sorted(VIEWS)}, not {tta!r}")
        with self._lock:  # calls from several threads take turns (each sees its own `tta`)
            self._tta = self.cfg.tta if tta is None else tta
            try:
                return self._score(paths)
            finally:
                self._tta = self.cfg.tta

    def _score(self, paths: Sequence[str | Path]) -> dict[str, np.ndarray]:
        import torch
        from tqdm.auto import tqdm

        paths = [str(p) for p in paths]
        n = len(paths)
        out: dict[str, np.ndarray] = {
            "p_defect": np.zeros(n, np.float64),
            "pred": np.zeros(n, np.int8),
            "logit_0": np.zeros(n, np.float32),
            "logit_1": np.zeros(n, np.float32),
            "batch_index": np.zeros(n, np.int32),
            "batch_size": np.zeros(n, np.int32),
            "batch_seconds": np.zeros(n, np.float64),
            "wait_seconds": np.zeros(n, np.float64),
        }
        sizes: list[tuple[int, int]] = [(0, 0)] * n
        t_start = time.perf_counter()
        bar = tqdm(total=n, desc="cloud scoring", unit="img", disable=not self.cfg.progress, dynamic_ncols=True)
        t_wait = time.perf_counter()

        def collect(flight) -> None:
            prepared, host, events, seconds, waited = flight
            if events is not None:  # device time from this batch's start to its results on the host
                start, done = events
                done.synchronize()
                seconds = start.elapsed_time(done) / 1000.0
            values = host.numpy()
            lo = prepared.index * self.cfg.batch_size
            hi = lo + len(prepared.paths)
            out["logit_0"][lo:hi], out["logit_1"][lo:hi] = values[:, 0], values[:, 1]
            out["batch_index"][lo:hi] = prepared.index
            out["batch_size"][lo:hi] = hi - lo
            out["batch_seconds"][lo:hi] = seconds
            out["wait_seconds"][lo:hi] = waited
            sizes[lo:hi] = prepared.sizes
            bar.update(hi - lo)

        cuda = self.device.type == "cuda"
        in_flight = None
        with torch.inference_mode():
            for prepared in self._batches(paths):
                waited = time.perf_counter() - t_wait
                t0 = time.perf_counter()
                events = None
                if cuda:
                    stream = torch.cuda.current_stream(self.device)
                    events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    events[0].record(stream)
                batch = self.device_batch(prepared.batch)
                values = self._logits(batch)
                views = VIEWS[self._tta]
                if views > 1:  # one row per view: the image's score is their mean
                    values = values.view(len(prepared.paths), views, 2).mean(dim=1)
                values = values.float()
                seconds = 0.0
                if cuda:  # queue the copy of the results and go on to the next batch before reading them
                    host = torch.empty(values.shape, dtype=torch.float32, pin_memory=True)
                    host.copy_(values, non_blocking=True)
                    # on the scoring device's stream: with cuda:N the current device may be another GPU
                    events[1].record(stream)
                else:
                    host = values.cpu()
                    seconds = time.perf_counter() - t0
                if in_flight is not None:
                    collect(in_flight)
                in_flight = (prepared, host, events, seconds, waited)
                t_wait = time.perf_counter()
            if in_flight is not None:
                collect(in_flight)
        bar.close()
        diff = out["logit_1"].astype(np.float64) - out["logit_0"].astype(np.float64)
        out["p_defect"] = 1.0 / (1.0 + np.exp(-diff))  # softmax over the two label logits
        out["pred"] = (out["p_defect"] >= self.cfg.threshold).astype(np.int8)
        out["width"] = np.array([s[0] for s in sizes], np.int32)
        out["height"] = np.array([s[1] for s in sizes], np.int32)
        self.last_run = {"images": n, "seconds": time.perf_counter() - t_start}
        out.update(self._explanations(paths, out["pred"]))
        return out

    # ---- explanations ---------------------------------------------------------------
    def _explanations(self, paths: list[str], pred: np.ndarray) -> dict[str, np.ndarray]:
        n = len(paths)
        status = np.full(n, STATUS_NOT_REQUESTED if not self.cfg.explain else STATUS_NOT_DEFECT, dtype=object)
        raw = np.full(n, None, dtype=object)
        bboxes = np.full(n, None, dtype=object)
        desc = np.full(n, None, dtype=object)
        error = np.full(n, None, dtype=object)
        if self.cfg.explain:
            idx = np.flatnonzero(pred == 1)
            for start in range(0, len(idx), self.cfg.explain_batch_size):
                rows = idx[start : start + self.cfg.explain_batch_size]
                texts, sizes = self.generate_explanations([paths[i] for i in rows])
                for i, text, (w, h) in zip(rows, texts, sizes):
                    parsed = parse_explanation(text, w, h)
                    status[i], raw[i], error[i] = parsed.status, text, parsed.error
                    if parsed.explanation is not None:
                        bboxes[i] = parsed.explanation.model_dump_json(include={"bboxes"})
                        desc[i] = parsed.explanation.desc
        return {
            "explain_status": status,
            "explain_raw": raw,
            "explain_bboxes": bboxes,
            "explain_desc": desc,
            "explain_error": error,
        }

    def generate_explanations(self, paths: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
        """Generate the JSON explanation for a batch of images (greedy, left-padded)."""
        import torch

        images = [load_rgb(p, self.cfg.resize) for p in paths]
        batch = encode(self.processor, self.family, [self.explain_prefix] * len(images), images)
        batch = to_device(batch, self.device, self.dtype)
        tok = self.processor.tokenizer
        with torch.inference_mode():
            generated = self.model.generate(
                **forward_kwargs(batch),
                max_new_tokens=self.cfg.explain_max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        new = generated[:, batch["input_ids"].shape[1] :]
        return tok.batch_decode(new, skip_special_tokens=True), [im.size for im in images]

    # ---- tables -----------------------------------------------------------------------
    def score_manifest(self, manifest, out_path: str | Path) -> dict:
        """Score every row of a manifest (image_id, path; source_path and category where it has them)
        and write the `cloud_scores` table."""
        import pandas as pd

        from saec.artifacts.schemas import source_paths
        from saec.artifacts.store import read_paths, write_table

        missing = [c for c in ("image_id", "path") if c not in manifest.columns]
        if missing:
            raise ValueError(f"manifest lacks columns {missing}")
        n = len(manifest)
        read = read_paths(manifest)  # where this machine reads each file (`path` is what the table records)
        tta = np.full(n, self.cfg.tta, dtype=object)
        if self.cfg.tta != "none" and self.cfg.tta_categories is not None:
            listed = (manifest["category"].isin(self.cfg.tta_categories).to_numpy()
                      if "category" in manifest else np.zeros(n, bool))
            tta[~listed] = "none"
        scores, seconds = {}, 0.0
        for kind in dict.fromkeys(tta):  # each augmentation in one call, rows in manifest order
            rows = np.flatnonzero(tta == kind)
            part = self.score([read[i] for i in rows], tta=kind)
            seconds += self.last_run["seconds"]
            for key, values in part.items():
                if key not in scores:
                    scores[key] = np.empty(n, dtype=values.dtype)
                scores[key][rows] = values
        if not scores:  # an empty manifest
            scores = self.score([])
            seconds = self.last_run["seconds"]
        df = pd.DataFrame(
            {
                "image_id": manifest["image_id"].astype(str).to_numpy(),
                "path": manifest["path"].astype(str).to_numpy(),
                "source_path": source_paths(manifest),
                "p_defect": scores["p_defect"],
                "logit_0": scores["logit_0"],
                "logit_1": scores["logit_1"],
                "score_kind": np.where(tta == "five_crop", "answer_logprob_mean",
                                       np.where(tta == "dihedral", "label_logit_mean", "label_logit")),
                "family": np.full(n, self.family),
                "model_id": np.full(n, self.model_id),
                "adapter_id": np.full(n, self.adapter_id, dtype=object),
                "impl": np.full(n, self.cfg.impl),
                "tta": tta.astype(str),
                "resize": np.full(n, self.cfg.resize if self.cfg.resize is not None else -1, np.int32),
                "width": scores["width"],
                "height": scores["height"],
                "batch_index": scores["batch_index"],
                "batch_size": scores["batch_size"],
                "batch_seconds": scores["batch_seconds"],
                "wait_seconds": scores["wait_seconds"],
                "explain_status": scores["explain_status"],
                "explain_raw": scores["explain_raw"],
                "explain_bboxes": scores["explain_bboxes"],
                "explain_desc": scores["explain_desc"],
                "explain_error": scores["explain_error"],
            }
        )
        ref = write_table(df, "cloud_scores", out_path)
        self.last_run = {"images": n, "seconds": seconds}
        return {
            "path": ref.path,
            "sha256": ref.sha256,
            "rows": n,
            "explain_threshold": self.cfg.threshold if self.cfg.explain else None,
            "seconds": seconds,
            "images_per_s": n / seconds if seconds > 0 else None,
            "model_id": self.model_id,
            "adapter_id": self.adapter_id,
            "family": self.family,
            "explanations_invalid": int((scores["explain_status"] == "invalid").sum()),
        }


def _shutdown_pools(*pools: ThreadPoolExecutor) -> None:
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def explain_prompt(processor) -> str:
    """The explanation prompt: the scoring conversation with its defect verdict, then the request.

    The image, the inspection instruction and the answer `Label: 1`, then a user turn with the
    explanation instruction; training's follow-up turn (`CloudTrainConfig.explain_turn`) renders
    the same conversation.
    """
    ask = {"role": "user", "content": [{"type": "text", "text": EXPLAIN_INSTRUCTION}]}
    return render_chat(processor, chat_messages(IMAGE_PLACEHOLDER, 1) + [ask], True)


def score_images(cfg: CloudScoreConfig, paths: Sequence[str | Path]) -> dict[str, np.ndarray]:
    """Load the model of `cfg` and score `paths` (a convenience for one-off use)."""
    return VLMScorer(cfg).score(paths)
