"""Recipe study for the embedded tiny cloud model: train and score many recipes side by side.

Each run trains the tiny Qwen2.5-VL with the project's own `train_vlm` on a synthetic draw's
SFT split and scores that draw's holdout (and its own training images) with `VLMScorer`.
Runs are separate processes that share out the CPU cores (one thread each when there are more
runs than cores), so a machine with many cores (and a GPU) runs a whole study at once. Draws
use a generator seed other than the embedded default's, so no recipe is chosen on the holdout
the pipeline reports.

    # a draw: the embedded data's look, STUDY_BASE counts times --scale, generator seed 31
    python benchmarks/cloud_recipes.py draw /tmp/recipes/draw31 --seed 31 --scale 1
    # a study on it (writes benchmarks/results/cloud_recipes_<study>.json)
    python benchmarks/cloud_recipes.py run /tmp/recipes/draw31 --study depth --device cuda --workers 10

`draw` needs the project's full environment. `run` needs the cloud branch's packages (torch,
transformers, peft, pydantic, pandas, pyarrow, Pillow) but not Prefect or Ultralytics, so it runs
on a bare GPU machine; `regen` needs pydantic, NumPy, Pillow and OpenCV. A draw too large to copy
can be re-rendered where it runs: `regen DRAW` draws the images again from the draw's meta.json
and checks every file against the SFT and holdout lists (an image's id is the SHA-256 of its
bytes). Paths in those lists are absolute, so re-render at the same path. Every run starts from
scratch in its own folder under `--work`; a run that fails is recorded as failed and makes
`run` exit non-zero.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# The counts that --scale multiplies: per category, 80 good training images, 80 good and 40 per
# defect type in test/ (the embedded default's counts until the data2 study; it now draws twice
# these). Every study's draw and its results are stated in these units.
STUDY_BASE = dict(n_train_good=80, n_test_good=80, n_test_defect_per_type=40)
# What a draw at scale 1 trains on: every good training image, and the half of each defect type's
# test images that the published run's SFT split (defect_train_ratio 0.5) takes.
SUBSET_GOOD, SUBSET_DEFECT = STUDY_BASE["n_train_good"], STUDY_BASE["n_test_defect_per_type"] // 2

# A run: (name, seed, train overrides, tiny-model overrides, training-set scale). The scale keeps
# the first 80*k good images of each category and 20*k images of each defect type, in list order.
Run = tuple[str, int, dict, dict, int | None]
VD4 = {"vision_depth": 4, "vision_fullatt_block_indexes": [1, 3]}
STUDIES: dict[str, list[Run]] = {
    # a deeper vision tower (and language model), on a draw at the embedded counts
    "depth": [("default", 42, {}, {}, None)]
    + [(n, s, tr, ti, None) for n, tr, ti in [
        ("vision4", {}, VD4),
        ("vision4_full_last", {}, {"vision_depth": 4, "vision_fullatt_block_indexes": [3]}),
        ("vision4_mlp512", {}, {**VD4, "vision_intermediate_size": 512}),
        ("vision4_16ep", {"epochs": 16}, VD4),
    ] for s in (42, 7)]
    + [("vision6", 42, {}, {"vision_depth": 6, "vision_fullatt_block_indexes": [2, 5]}, None),
       ("language4", 42, {}, {"num_hidden_layers": 4}, None)],
    # more distinct training images for about the same number of optimizer steps, on a draw at 4x
    # counts (scale 4 keeps 2,532 of its 2,560 SFT images: some defect types hold more than 80)
    "data": [(n, s, tr, {}, k) for n, tr, k in [
        ("x1_24ep", {}, 1), ("x2_12ep", {"epochs": 12}, 2), ("x4_6ep", {"epochs": 6}, 4), ("x4_9ep", {"epochs": 9}, 4),
    ] for s in (42, 7)]
    # and four times the steps as well: about 15 minutes of training on a 2-core CPU
    + [("x4_24ep", 42, {}, {}, 4)],
    # an average of the trained weights instead of the last step's, on a draw at the embedded counts
    # (every run is also scored with the eight flips and turns on the orientation-free categories)
    "average": [(n, s, tr, {}, None) for n, tr in [
        ("default", {}), ("ema_0.995", {"ema_decay": 0.995}), ("ema_0.998", {"ema_decay": 0.998}),
    ] for s in (42, 7, 3)],
    # a follow-up turn on every defect example that asks for its explanation (boxes of the
    # ground-truth mask's regions and the defect type), on a draw at the embedded counts
    "explain": [(n, s, tr, {}, None) for n, tr in [
        ("default", {}), ("explain", {"explain_turn": True}),
    ] for s in (42, 7, 3)],
    # longer training, with brightness and contrast jitter; and the images at their drawn size
    # (128 px, 8-px patches) instead of resized to 112
    "combine": [(n, s, tr, ti, None) for n, tr, ti in [
        ("32ep", {"epochs": 32}, {}),
        ("32ep_light", {"epochs": 32, "augment_lighting": 0.15}, {}),
        ("32ep_light25", {"epochs": 32, "augment_lighting": 0.25}, {}),
        ("40ep_light", {"epochs": 40, "augment_lighting": 0.15}, {}),
    ] for s in (42, 7, 3)]
    + [("native128", s, {}, {"image_size": 128, "patch_size": 8, "window_size": 64}, None) for s in (42, 7)],
    # the recipe of the time (32 epochs, lighting 0.15) on twice the training images for the same,
    # 1.25 and 1.5 times the optimizer steps, on a draw at twice the counts (its holdout: 640 + 640)
    "data2": [(n, s, tr, {}, k) for n, tr, k in [
        ("x1_32ep", {}, 1), ("x2_16ep", {"epochs": 16}, 2),
    ] for s in (42, 7, 3)]
    + [("x2_20ep", s, {"epochs": 20}, {}, 2) for s in (42, 7, 3, 11, 5, 19)]
    + [("x2_24ep", s, {"epochs": 24}, {}, 2) for s in (42, 7)],
}
# Each study ran on the tiny recipe of its day: the earlier studies on 24 epochs without lighting
# jitter, data2 on 32 epochs with jitter of 0.15. Pinning that here keeps every run training as it
# did when `CloudTrainConfig.tiny` changes (the committed results record only the overrides).
# Every study trained from random weights: the output layer trained too (the embedded recipe now
# fine-tunes a pretrained stand-in and leaves it alone).
_SCRATCH = {"trainable": "lora+vision", "train_output_layer": True}
_R24 = {**_SCRATCH, "epochs": 24, "augment_lighting": 0.0}
_PINNED = {"depth": _R24, "data": _R24, "average": _R24, "explain": _R24, "combine": _R24,
           "data2": {**_SCRATCH, "epochs": 32, "augment_lighting": 0.15}}
STUDIES = {study: [(n, s, {**_PINNED[study], **tr}, ti, k) for n, s, tr, ti, k in runs]
           for study, runs in STUDIES.items()}


# --------------------------------------------------------------------------- draws


def cmd_draw(args) -> None:
    from saec.config import EMBEDDED_SYNTHETIC
    from saec.datasets.mvtec import read_mvtec
    from saec.datasets.synthetic import SyntheticConfig, generate_mvtec
    from saec.tasks.sft import SFTConfig, mask_paths, split_sft, write_jsonl

    k = args.scale
    base = SyntheticConfig(**EMBEDDED_SYNTHETIC)
    cfg = SyntheticConfig(**{  # validates the category names and counts
        **base.model_dump(), "seed": args.seed,
        "categories": args.categories.split(",") if args.categories else base.categories,
        **{name: n * k for name, n in STUDY_BASE.items()},
    })
    out = args.draw.resolve()
    generate_mvtec(out / "mvtec_ad", cfg, progress=True)
    images = read_mvtec(out / "mvtec_ad").images
    train, holdout = split_sft(images, SFTConfig())
    write_jsonl(train, out / "sft_train.jsonl", mask_paths(images))
    rows = [dict(image_id=r.image_id, path=r.path, label=int(r.label), category=r.category, defect_type=r.defect_type)
            for r in holdout.itertuples()]
    (out / "holdout.json").write_text(json.dumps(rows))
    meta = dict(synthetic=cfg.model_dump(mode="json"), scale=k, sft_train=len(train), holdout=len(holdout),
                holdout_defects=int(holdout.label.sum()))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta))


def cmd_regen(args) -> None:
    from saec.datasets.synthetic import SyntheticConfig, generate_mvtec

    out = args.draw.resolve()
    meta = json.loads((out / "meta.json").read_text())
    generate_mvtec(out / "mvtec_ad", SyntheticConfig(**meta["synthetic"]), overwrite=True)
    listed = {r["image"]: r["image_id"] for r in map(json.loads, open(out / "sft_train.jsonl"))}
    listed.update({r["path"]: r["image_id"] for r in json.loads((out / "holdout.json").read_text())})
    missing = [p for p in listed if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} of {len(listed)} listed images were not rendered, e.g. {missing[0]}: "
                         "the lists name other paths (re-render at the path the draw was made at)")
    bad = [p for p, digest in listed.items() if hashlib.sha256(Path(p).read_bytes()).hexdigest() != digest]
    if bad:
        raise SystemExit(f"{len(bad)} of {len(listed)} images differ from the draw's lists, e.g. {bad[0]}")
    print(f"re-rendered {len(listed)} listed images, all identical")


# --------------------------------------------------------------------------- one run


def subset(rows: list[dict], k: int) -> list[dict]:
    seen: dict[tuple[str, str], int] = {}
    keep = []
    for r in rows:
        key = (r["category"], r["defect_type"])
        if seen.get(key, 0) < (SUBSET_GOOD if r["label"] == 0 else SUBSET_DEFECT) * k:
            seen[key] = seen.get(key, 0) + 1
            keep.append(r)
    return keep


def by_type(rows: list[dict], correct) -> dict[str, float]:
    acc: dict[str, list[int]] = {}
    for r, c in zip(rows, correct):
        acc.setdefault(f'{r["category"]}/{r["defect_type"]}', []).append(int(c))
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(acc.items())}


def cmd_job(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from saec.tasks.cloud.config import CloudScoreConfig, CloudTrainConfig, TinyModelConfig
    from saec.tasks.cloud.engine import VLMScorer
    from saec.tasks.cloud.tiny import build_tiny_qwen
    from saec.tasks.cloud.train import train_vlm
    from saec.tasks.metrics import auroc

    name, seed, train_over, tiny_over, k = json.loads(args.spec)
    draw, work = args.draw.resolve(), args.work / f"{name}_{seed}"
    shutil.rmtree(work, ignore_errors=True)  # never resume or report an earlier run's training
    work.mkdir(parents=True)
    sft = draw / "sft_train.jsonl"
    train_rows = [json.loads(line) for line in open(sft)]
    if k is not None:
        train_rows = subset(train_rows, k)
        sft = work / "sft_train.jsonl"
        sft.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    tiny = TinyModelConfig(**tiny_over)
    model = build_tiny_qwen(work / "model", tiny)
    t0 = time.perf_counter()
    cfg = CloudTrainConfig.tiny(model, device=args.device, progress=False, seed=seed, preprocess_workers=1,
                                resize=tiny.image_size, **train_over)
    summary = train_vlm(cfg, sft, None, work / "ckpt", work / "out")
    train_s = time.perf_counter() - t0
    scorer = VLMScorer(CloudScoreConfig(
        model=str(model) if summary["adapter_dir"] else summary["model_dir"], adapter=summary["adapter_dir"],
        resize=cfg.resize, batch_size=64, threshold=0.5, progress=False, device=args.device,
        compile_vision=False, compile_language=False))
    holdout = json.loads((draw / "holdout.json").read_text())
    p = np.asarray(scorer.score([r["path"] for r in holdout])["p_defect"], float)
    y = np.array([r["label"] for r in holdout])
    # the same model with test-time flips and turns where training turned the images too
    turned = np.array([cfg.augment_categories is None or r["category"] in cfg.augment_categories for r in holdout])
    p_tta = p.copy()
    p_tta[turned] = scorer.score([r["path"] for r, t in zip(holdout, turned) if t], tta="dihedral")["p_defect"]
    pt = np.asarray(scorer.score([r["image"] for r in train_rows])["p_defect"], float)
    yt = np.array([r["label"] for r in train_rows])
    result = dict(
        name=name, seed=seed, train_overrides=train_over, tiny_overrides=tiny_over, train_scale=k,
        train_images=len(train_rows), train_s=round(train_s, 1), final_loss=summary["final_loss"],
        holdout_acc_at_0_5=round(float(((p >= 0.5) == y).mean()), 4),
        holdout_acc_at_0_26=round(float(((p >= 0.26) == y).mean()), 4),
        holdout_auroc=None if (auc := auroc(y, p)) is None else round(auc, 4),
        train_acc_at_0_5=round(float(((pt >= 0.5) == yt).mean()), 4),
        holdout_tta_acc_at_0_5=round(float(((p_tta >= 0.5) == y).mean()), 4),
        holdout_tta_acc_at_0_26=round(float(((p_tta >= 0.26) == y).mean()), 4),
        holdout_tta_auroc=None if (auc := auroc(y, p_tta)) is None else round(auc, 4),
        holdout_by_type_at_0_5=by_type(holdout, (p >= 0.5) == y),
        train_by_type_at_0_5=by_type(train_rows, (pt >= 0.5) == yt),
        holdout_tta_by_type_at_0_5=by_type(holdout, (p_tta >= 0.5) == y),
    )
    if cfg.explain_turn:
        result["holdout_explain"] = explain_quality(scorer, holdout, cfg.resize)
    (work / "result.json").write_text(json.dumps(result))
    print("done", name, seed, result["holdout_acc_at_0_5"], result["holdout_acc_at_0_26"],
          "tta", result["holdout_tta_acc_at_0_5"], result["holdout_tta_acc_at_0_26"], flush=True)


def explain_quality(scorer, holdout: list[dict], size: int) -> dict:
    """Explanations generated for the holdout's defect images against their ground-truth masks.

    valid: share that parse and validate; desc: share naming the defect type; iou: mean IoU of
    the box around all predicted regions with the box around all true ones (0 for an invalid one).
    """
    from saec.tasks.cloud.explain import ExplainTarget, describe_defect, map_boxes, parse_explanation
    from saec.datasets.images import mask_boxes

    defects = [r for r in holdout if r["label"] == 1]
    texts: list[str] = []
    for i in range(0, len(defects), 64):
        texts += scorer.generate_explanations([r["path"] for r in defects[i : i + 64]])[0]

    def hull(boxes):
        return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]

    valid, named, ious = 0, 0, []
    for r, text in zip(defects, texts):
        p = Path(r["path"])
        boxes, w, h = mask_boxes(p.parents[2] / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")
        truth = map_boxes(ExplainTarget(bboxes=boxes, desc="x", width=w, height=h), (size, size))
        parsed = parse_explanation(text, size, size)
        if parsed.explanation is None:
            ious.append(0.0)
            continue
        valid += 1
        named += parsed.explanation.desc == describe_defect(r["defect_type"])
        if not parsed.explanation.bboxes or not truth:
            ious.append(0.0)
            continue
        a, b = hull(parsed.explanation.bboxes), hull(truth)
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        ious.append(inter / union if union > 0 else 0.0)
    n = len(defects)
    return dict(images=n, valid=round(valid / n, 4), desc=round(named / n, 4), iou=round(sum(ious) / n, 4),
                example=texts[0] if texts else None)


# --------------------------------------------------------------------------- a study


def machine(device: str) -> dict:
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_model  # benchmarks/machine.py

    out = dict(cpu=cpu_model(), cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
               transformers=transformers.__version__)
    try:
        out["peft"] = __import__("peft").__version__
    except ImportError:
        out["peft"] = "unavailable"
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def cmd_run(args) -> None:
    if args.out is None and (args.only or args.epochs):
        raise SystemExit("--only and --epochs run part of a study: name its results file with --out "
                         "(the default is the whole study's committed file)")
    runs = STUDIES[args.study]
    if args.only:
        wanted = {tuple(x.strip().split(":")) for x in args.only.split(",") if x.strip()}
        unknown = wanted - {(r[0], str(r[1])) for r in runs}
        if unknown:
            raise SystemExit(f"--only: the {args.study} study has no run {', '.join(':'.join(u) for u in sorted(unknown))}")
        runs = [r for r in runs if (r[0], str(r[1])) in wanted]
    if args.epochs:  # a quick check of the harness, not a study
        runs = [(n, s, {**tr, "epochs": args.epochs}, ti, k) for n, s, tr, ti, k in runs]
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    meta = json.loads((args.draw / "meta.json").read_text())
    threads = max(1, (os.cpu_count() or 1) // min(args.workers, len(runs)))  # the cores, shared out
    queue, running, t0 = list(runs), [], time.time()
    exits: dict[tuple[str, int], int] = {}
    while queue or running:
        while queue and len(running) < args.workers:
            run = queue.pop(0)
            log = open(work / "logs" / f"{run[0]}_{run[1]}.log", "w")
            cmd = [sys.executable, __file__, "job", str(args.draw), "--work", str(work), "--device", args.device,
                   "--threads", str(threads), "--spec", json.dumps(run)]
            running.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in list(running):
            run, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                exits[run[0], run[1]] = proc.returncode
                print(f"{run[0]} seed {run[1]}: exit {proc.returncode} at {time.time() - t0:.0f} s", flush=True)
    results = []
    for name, seed, *_ in runs:
        path = work / f"{name}_{seed}" / "result.json"
        if exits[name, seed] == 0 and path.exists():
            results.append(json.loads(path.read_text()))
        else:
            results.append(dict(name=name, seed=seed, failed=True, log=str(work / "logs" / f"{name}_{seed}.log")))
    record = dict(
        study=args.study, when=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine(args.device), device=args.device, workers=args.workers, threads_per_run=threads,
        epochs_override=args.epochs or None,
        draw=dict(seed=meta["synthetic"]["seed"], scale=meta["scale"], sft_train=meta["sft_train"],
                  holdout=meta["holdout"]),
        wall_s=round(time.time() - t0, 1), runs=results,
    )
    out = args.out or RESULTS / f"cloud_recipes_{args.study}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'run':<20} {'seed':>4} {'acc@0.5':>8} {'acc@0.26':>8} {'AUROC':>6} {'train':>6} {'tta@0.5':>8} {'tta@0.26':>8}")
    for r in results:
        if r.get("failed"):
            print(f"{r['name']:<20} {r['seed']:>4} failed")
        else:
            auc = "n/a" if r["holdout_auroc"] is None else f"{r['holdout_auroc']:.3f}"
            tta = (f"{r['holdout_tta_acc_at_0_5']:>8.3f} {r['holdout_tta_acc_at_0_26']:>8.3f}"
                   if "holdout_tta_acc_at_0_5" in r else "")
            print(f"{r['name']:<20} {r['seed']:>4} {r['holdout_acc_at_0_5']:>8.3f} {r['holdout_acc_at_0_26']:>8.3f} "
                  f"{auc:>6} {r['train_acc_at_0_5']:>6.3f} {tta}")
    print("wrote", out)
    failed = [f"{r['name']}:{r['seed']}" for r in results if r.get("failed")]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are under {work / 'logs'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("draw", help="render a synthetic draw and its SFT split")
    d.add_argument("draw", type=Path)
    d.add_argument("--seed", type=int, default=31)
    d.add_argument("--scale", type=int, default=1, help="multiplies the study base's image counts (STUDY_BASE)")
    d.add_argument("--categories", default="", help="comma-separated MVTec categories (default: the embedded four)")
    g = sub.add_parser("regen", help="render a draw's images again from its meta.json and check them")
    g.add_argument("draw", type=Path)
    r = sub.add_parser("run", help="run a study on a draw")
    r.add_argument("draw", type=Path)
    r.add_argument("--study", choices=sorted(STUDIES), required=True)
    r.add_argument("--only", default="", help="comma-separated name:seed runs of the study")
    r.add_argument("--epochs", type=int, default=0, help="train every run this many epochs (a quick check)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    r.add_argument("--work", type=Path, default=Path("/tmp/saec-recipes"))
    r.add_argument("--out", type=Path, default=None)
    j = sub.add_parser("job")
    j.add_argument("draw", type=Path)
    j.add_argument("--work", type=Path, required=True)
    j.add_argument("--device", default="cpu")
    j.add_argument("--threads", type=int, default=1)
    j.add_argument("--spec", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dict(draw=cmd_draw, regen=cmd_regen, run=cmd_run, job=cmd_job)[args.cmd](args)


if __name__ == "__main__":
    main()
