"""Edge throughput on the CPU: files to verdicts, the project's runtime against plain Ultralytics.

Baseline (the published run's way): ``YOLO(weights).predict(file)`` one file at a time, then the
confidence measures and the rule from its probabilities. Ours: `predict_edge` (threaded
decode + batched ONNX Runtime, verdicts, Parquet written). Same checkpoint, same image
size, same files, measured in one run on one machine, alternating, best of `--repeats`.

    python benchmarks/edge_cpu.py                       # synthetic images, yolo11s-cls.yaml, 224 and 448
    python benchmarks/edge_cpu.py --weights yolo11s-cls.pt --images /data/mvtec_holdout/val

Writes benchmarks/results/edge_cpu.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from saec.env import configure_offline

configure_offline()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from saec.artifacts.hashing import sha256_file  # noqa: E402
from saec.artifacts.store import read_table  # noqa: E402
from saec.datasets.images import is_image_name  # noqa: E402
from saec.tasks.edge.config import EdgeConfig, Thresholds, available_cores  # noqa: E402
from saec.tasks.edge.measures import measures_from_probs, rule_verdict  # noqa: E402
from saec.tasks.edge.model import load_classifier, ultralytics  # noqa: E402
from saec.tasks.edge.predict import predict_edge  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, loadavg  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED_THRESHOLDS = Thresholds(smax_thr=0.55, margin_thr=0.03, ent_thr=0.95)


def matmul_gflops(threads: int, n: int = 1024, reps: int = 30) -> float:
    """Measured float32 matmul rate of this CPU right now (the best of `reps` products).

    On a shared machine this is taken several times during the run and the highest kept.
    """
    torch.set_num_threads(threads)
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_image(weights: Path, imgsz: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = load_classifier(weights).module
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.rand(1, 3, imgsz, imgsz))
    return float(counter.get_total_flops())


def synthetic_images(root: Path, n: int) -> list[Path]:
    from saec.datasets.synthetic import SyntheticConfig, generate_all

    if not (root / "mvtec_ad").is_dir():
        generate_all(root, SyntheticConfig())
    files = sorted(p for p in (root / "mvtec_ad").rglob("*.png") if "ground_truth" not in p.parts)
    rng = np.random.default_rng(0)
    return [files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))]


def image_size(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return f"{im.width}x{im.height}"


def folder_images(root: Path, n: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p))
    if not files:
        sys.exit(f"no images under {root}")
    return files[:n]


def seeded_checkpoint(yaml_name: str, out: Path, seed: int = 0) -> Path:
    """A checkpoint file of the architecture with seeded random weights (speed does not depend on the values)."""
    ul = ultralytics()
    torch.manual_seed(seed)
    yolo = ul.YOLO(yaml_name, task="classify")
    path = out / (Path(yaml_name).stem + f"-seed{seed}.pt")
    yolo.save(path)
    return path


def run_baseline(weights: Path, files: list[Path], imgsz: int) -> tuple[float, pd.DataFrame]:
    """Plain Ultralytics: one predict() call per file, then the published run's measures and rule per image.

    Timed from loading the checkpoint, as `predict_edge` is (both load the model once per call).
    """
    ul = ultralytics()
    rows = []
    t = time.perf_counter()
    yolo = ul.YOLO(str(weights), task="classify")
    for f in files:
        probs = yolo.predict(str(f), imgsz=imgsz, device="cpu", verbose=False)[0].probs.data.cpu().numpy()
        m = measures_from_probs(probs[None].astype(np.float64))
        verdict = int(rule_verdict(m.smax, m.margin, m.entropy, SEED_THRESHOLDS)[0])
        rows.append({"path": str(f), "smax": float(m.smax[0]), "top1": int(m.top1[0]), "verdict": verdict})
    return time.perf_counter() - t, pd.DataFrame(rows)


def run_ours(
    cfg: EdgeConfig, weights: Path, files: list[Path], cache: Path, out: Path, calibration: list[str] | None = None
) -> tuple[float, pd.DataFrame, dict]:
    manifest = pd.DataFrame({"image_id": [p.name for p in files], "path": [str(p) for p in files]})
    t = time.perf_counter()
    info = predict_edge(cfg, manifest, out, cache, thresholds=SEED_THRESHOLDS, int8_calibration=calibration)
    return time.perf_counter() - t, read_table(out), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="yolo11s-cls.yaml",
                    help=".pt checkpoint, or a .yaml built with seeded random weights")
    ap.add_argument("--images", type=Path, default=None, help="folder of images (default: synthetic MVTec layout)")
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--imgsz", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=RESULTS / "edge_cpu.json")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="saec-edge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cores = available_cores()
    torch.set_num_threads(cores)
    files = folder_images(args.images, args.n) if args.images else synthetic_images(work / "synthetic", args.n)
    weights = Path(args.weights) if args.weights.endswith(".pt") else seeded_checkpoint(args.weights, work)
    sizes = sorted({image_size(p) for p in files[:50]})
    console = Console(width=160)
    shown = ", ".join(sizes[:4]) + (" ..." if len(sizes) > 4 else "")
    console.print(f"{len(files)} images ({shown}), weights {weights.name}, {cores} cores, load {loadavg()}")

    import onnxruntime
    import ultralytics as ul_pkg

    record = {
        "benchmark": "edge_cpu",
        "what": "image files to per-image verdicts (decode, preprocess, classify, measures, rule)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores_available": cores,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": loadavg(),
            "note": "shared machine: other jobs ran at the same time; compare ratios, not absolute figures",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ultralytics": ul_pkg.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
        "weights": {"name": weights.name, "from": args.weights, "sha256_16": sha256_file(weights)[:16]},
        "images": {"n": len(files), "source": str(args.images) if args.images else "synthetic MVTec-layout PNGs",
                   "sizes": sizes[:10]},
        "baseline": "YOLO(weights) then .predict(file, imgsz, device='cpu') one file at a time + measures + rule",
        "ours": "saec.tasks.edge.predict_edge: model load, threaded decode/preprocess, batched ONNX Runtime, "
                "Parquet out",
        "timing": "both timed from loading the checkpoint to the last verdict, after one warm-up of each on 4 images; "
                  "the one-time ONNX export (cached by weights hash and imgsz) is reported separately",
        "int8": "precision=int8: ONNX Runtime static per-channel QDQ quantization calibrated on 32 of the images; "
                "the weights here are random, so its agreement figures only exercise the code path (on a trained "
                "two-class model it changed p_defect by at most 0.03 with identical verdicts)",
        "batch_size": args.batch,
        "threads": cores,
        "repeats": args.repeats,
        "results": [],
    }
    rates = [matmul_gflops(cores)]

    for imgsz in args.imgsz:
        cfg = EdgeConfig(mode="imagenet_rule", weights=str(weights), imgsz=imgsz, batch_size=args.batch,
                         runtime="onnxruntime", progress=False)
        cache = work / "onnx-cache"
        cfg8 = cfg.model_copy(update={"precision": "int8"})
        calibration = [str(p) for p in files[:: max(1, len(files) // 32)][:32]]
        t = time.perf_counter()
        run_ours(cfg, weights, files[:4], cache, work / "warmup.parquet")  # exports and caches the ONNX graph
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        run_ours(cfg8, weights, files[:4], cache, work / "warmup.parquet", calibration)  # quantizes and caches
        quantize_s = time.perf_counter() - t
        run_baseline(weights, files[:4], imgsz)  # first-call costs (imports, kernel set-up) on both sides
        base_s, ours_s, int8_s, torch_s, loads = [], [], [], [], []
        for _ in range(args.repeats):
            loads.append(loadavg())
            s, base_df = run_baseline(weights, files, imgsz)
            base_s.append(s)
            s, ours_df, info = run_ours(cfg, weights, files, cache, work / f"edge-{imgsz}.parquet")
            ours_s.append(s)
            s, int8_df, info8 = run_ours(cfg8, weights, files, cache, work / f"edge-int8-{imgsz}.parquet", calibration)
            int8_s.append(s)
            s, torch_df, _ = run_ours(cfg.model_copy(update={"runtime": "torch"}), weights, files, cache,
                                      work / f"edge-torch-{imgsz}.parquet")
            torch_s.append(s)
        rates.append(matmul_gflops(cores))
        n = len(files)
        flops = flops_per_image(weights, imgsz)
        best_ours = n / min(ours_s)
        row = {
            "imgsz": imgsz,
            "n_images": n,
            "baseline_images_per_s": round(n / min(base_s), 2),
            "ours_images_per_s": round(best_ours, 2),
            "ratio": round(min(base_s) / min(ours_s), 2),
            "ours_int8_images_per_s": round(n / min(int8_s), 2),
            "ratio_int8": round(min(base_s) / min(int8_s), 2),
            "ours_torch_batched_images_per_s": round(n / min(torch_s), 2),
            "baseline_seconds": [round(x, 3) for x in base_s],
            "ours_seconds": [round(x, 3) for x in ours_s],
            "ours_int8_seconds": [round(x, 3) for x in int8_s],
            "int8_vs_fp32_on_calibration_images": info8.get("int8"),
            "int8_quantize_seconds": round(quantize_s, 2),
            "ours_torch_seconds": [round(x, 3) for x in torch_s],
            "ours_inference_seconds_last": info["inference_seconds"],
            "ours_wait_seconds_last": info["wait_seconds"],
            "onnx_export_and_verify_seconds": round(export_s, 2),
            "gflops_per_image": round(flops / 1e9, 3),
            "ours_gflops_per_s": round(best_ours * flops / 1e9, 1),
            "baseline_gflops_per_s": round(n / min(base_s) * flops / 1e9, 1),
            "max_abs_smax_diff_vs_baseline": float(np.abs(ours_df.smax.to_numpy() - base_df.smax.to_numpy()).max()),
            "top1_agreement_vs_baseline": float((ours_df.top1_class.to_numpy() == base_df.top1.to_numpy()).mean()),
            "verdict_agreement_vs_baseline": float((ours_df.verdict.to_numpy() == base_df.verdict.to_numpy()).mean()),
            "loadavg_before_repeats": loads,
        }
        record["results"].append(row)
        console.print(f"imgsz {imgsz}: baseline {row['baseline_images_per_s']} img/s, ours {row['ours_images_per_s']} "
                      f"img/s (x{row['ratio']}), int8 {row['ours_int8_images_per_s']} img/s (x{row['ratio_int8']}), "
                      f"load {loadavg()}")
    record["machine"]["loadavg_end"] = loadavg()
    rates.append(matmul_gflops(cores))
    peak = max(rates)
    record["machine"]["matmul_gflops_fp32"] = round(peak, 1)
    record["machine"]["matmul_gflops_fp32_samples"] = [round(r, 1) for r in rates]
    for r in record["results"]:  # fraction of the best fp32 matmul rate seen during the run
        r["ours_fraction_of_matmul_rate"] = round(r["ours_gflops_per_s"] / peak, 3)
        r["baseline_fraction_of_matmul_rate"] = round(r["baseline_gflops_per_s"] / peak, 3)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    table = Table(title=f"edge CPU: files to verdicts, {weights.name}, {len(files)} images, {cores} cores")
    for col in ("imgsz", "baseline img/s", "ours img/s", "ratio", "int8 img/s", "ratio int8", "ours torch img/s",
                "GFLOP/img", "of matmul peak", "max |Δsmax|", "verdict agree"):
        table.add_column(col, justify="right")
    for r in record["results"]:
        table.add_row(str(r["imgsz"]), f"{r['baseline_images_per_s']:.1f}", f"{r['ours_images_per_s']:.1f}",
                      f"{r['ratio']:.2f}x", f"{r['ours_int8_images_per_s']:.1f}", f"{r['ratio_int8']:.2f}x",
                      f"{r['ours_torch_batched_images_per_s']:.1f}", f"{r['gflops_per_image']:.2f}",
                      f"{100 * r['ours_fraction_of_matmul_rate']:.0f} %", f"{r['max_abs_smax_diff_vs_baseline']:.1e}",
                      f"{100 * r['verdict_agreement_vs_baseline']:.0f} %")
    console.print(table)
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
