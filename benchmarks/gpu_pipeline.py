"""The whole pipeline at real size on one GPU: `saec run` through Prefect, as a user runs it.

What it writes first (under --work), then what it runs:

* a Qwen2.5-VL-7B-Instruct folder and a llava-1.5-7b-hf folder: the published configs,
  tokenizers, processors and chat templates (from --models, weightless folders) with random
  bf16 weights, saved as safetensors shards;
* a YOLO11s-cls checkpoint (Ultralytics' model definition, random weights);
* an MVTec AD layout at MVTec's size (1024 x 1024 PNG, masks beside) with enough test images
  for the published run's 500 + 500 holdout once half the defects go to SFT training, and a KolektorSDD2
  layout at its size (230 x 630), both from the project's synthetic generator;
* `saec run` with data.source=folders, those models, the published run's edge (ImageNet rule) and
  scoring settings, and the published run's QLoRA recipe (NF4, LoRA r=8, merger trainable) cut to
  `--train-steps` optimizer steps of 16 images;
* phase "kill": the run is killed (SIGKILL, whole process group) as soon as training has
  written its first checkpoint; phase "resume": `saec run` again, which resumes training from
  that checkpoint and finishes every stage (compile caches cold: a fresh SAEC_HOME);
  phase "warm": a new store, the adapter just trained, the MVTec set only, SAEC and the cloud-only
  system again in a fresh process with the compile caches the first one left;
* phase "prime" (instead of kill and resume, where time is short): train, then SAEC on MVTec,
  which fills the compile cache; phase "split": SAEC again with the edge on half the cores and a
  quarter of them decoding; phase "edge_trained": the edge fine-tuned in the flow from the same
  checkpoint (supervised mode), so that SAEC routes with a trained edge's confidence. `--no-llava`
  writes no LLaVA folder (the runs then score no LLaVA).

Random weights: accuracies are chance. The point is that every stage runs at real size, and
what each costs.

    python benchmarks/gpu_pipeline.py --models DIR --work DIR [--phases setup,kill,resume,warm,split,edge_trained]
    python benchmarks/gpu_pipeline.py --models DIR --work DIR --no-llava --phases setup,prime,warm,split --train-steps 4
    python benchmarks/gpu_pipeline.py --models DIR --work DIR --smoke   # the same on a CPU, small

The phases can run in separate invocations on the same --work folder. Results: JSON with the
device, versions, each phase's wall time and stage times, both reports' systems (GPU
utilisation, power, energy per correct decision) and the training log, written to
--out (default $OUT or benchmarks/results/, as gpu_pipeline_<device>.json), with the reports and figures
beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the --smoke model sizes: the real tokenizers and processors, tiny layers (a code check on a CPU)
SMOKE_QWEN = ({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "layer_types": ["full_attention"] * 2,
               "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6}},
              {"depth": 2, "fullatt_block_indexes": [1], "out_hidden_size": 128, "hidden_size": 160,
               "intermediate_size": 320, "num_heads": 4})
SMOKE_LLAVA = ({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
                "num_key_value_heads": 4},
               {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4})
PHASES = ("setup", "kill", "resume", "prime", "warm", "split", "edge_trained")


# --------------------------------------------------------------------------- set-up


def write_vlm(weightless: Path, folder: Path, device: str, dtype: str, overrides) -> dict:
    import torch

    from random_vlm import build_random_vlm  # benchmarks/random_vlm.py

    t = time.perf_counter()
    text, vision = overrides or (None, None)
    loaded = build_random_vlm(weightless, device=device, dtype=dtype, seed=0, text_overrides=text,
                              vision_overrides=vision)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
    loaded.processor.save_pretrained(tmp)
    for f in weightless.iterdir():  # chat template and tokenizer files as published
        if (f.is_file() and not (tmp / f.name).exists() and f.suffix in (".json", ".txt", ".jinja", ".model")
                and not f.name.endswith(".index.json")):  # the weights' index is the saved model's own
            shutil.copy2(f, tmp / f.name)
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    os.replace(tmp, folder)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"seconds": round(time.perf_counter() - t, 1), "gb": round(size / 1e9, 2),
            "shards": len(list(folder.glob("*.safetensors")))}


def write_edge(path: Path) -> dict:
    from ultralytics import YOLO

    t = time.perf_counter()
    model = YOLO("yolo11s-cls.yaml", task="classify")
    model.save(str(path))
    return {"seconds": round(time.perf_counter() - t, 1), "mb": round(path.stat().st_size / 2**20, 1)}


def write_data(work: Path, smoke: bool, workers: int) -> dict:
    from saec.datasets.synthetic import SyntheticConfig, generate_ksdd2, generate_mvtec

    t = time.perf_counter()
    if smoke:
        cfg = SyntheticConfig(mvtec_size=256, ksdd2_size=(116, 320), n_train_good=4, n_test_good=8,
                              n_test_defect_per_type=4, ksdd2_n_train=20, ksdd2_n_test=40)
    else:  # 4 categories x 4 defect types: 1,024 test defects, 512 test goods, 64 train goods
        cfg = SyntheticConfig(mvtec_size=1024, ksdd2_size=(230, 630), n_train_good=16, n_test_good=128,
                              n_test_defect_per_type=64, ksdd2_n_train=246, ksdd2_n_test=440, ksdd2_defect_rate=0.25)
    mvtec = generate_mvtec(work / "mvtec", cfg, overwrite=True, workers=workers)
    ksdd2 = generate_ksdd2(work / "ksdd2", cfg, overwrite=True, workers=workers)
    return {"seconds": round(time.perf_counter() - t, 1), "mvtec_size": cfg.mvtec_size,
            "ksdd2_size": list(cfg.ksdd2_size), "mvtec": mvtec, "ksdd2": ksdd2}


# --------------------------------------------------------------------------- runs


def saec_command() -> list[str]:
    return [sys.executable, "-m", "saec.cli"]


def overrides(work: Path, args, store: Path, extra: list[str]) -> list[str]:
    sets = [
        "data.source=folders", f"data.mvtec_root={work / 'mvtec'}", f"data.ksdd2_root={work / 'ksdd2'}",
        f"cloud.model={work / 'Qwen2.5-VL-7B-Instruct'}",
        f"edge.weights={work / 'yolo11s-cls.pt'}",
        "edge.mode=" + ("supervised" if "edge.mode=supervised" in extra else "imagenet_rule"),
        f"store.root={store}",
        # the published run's recipe, cut to a number of optimizer steps; a checkpoint every few
        "cloud.train.epochs=1", f"cloud.train.max_steps={args.train_steps}",
        f"cloud.train.checkpoint_every={args.checkpoint_every}",
    ]
    if (work / "llava-1.5-7b-hf").is_dir():
        sets.append(f"cloud.llava_model={work / 'llava-1.5-7b-hf'}")
    if args.smoke:
        sets += ["holdout.n_good=16", "holdout.n_defect=16", "cloud.train.resize=112", "cloud.score.resize=112",
                 "cloud.baseline_score.resize=112", "cloud.train.batch_size=2", "cloud.train.grad_accum=2"]
    return [a for s in sets + extra for a in ("--set", s)]


def checkpoints(store: Path) -> list[Path]:
    return [p for p in store.glob("work/train_cloud/*/checkpoints/step-*") if p.is_dir()]


def run_saec(sets: list[str], env: dict, log: Path, kill_at_checkpoint: Path | None = None,
             timeout: float = 3600) -> dict:
    """`saec run` in a new process group; with kill_at_checkpoint (a store), SIGKILL it once training
    has written a checkpoint there."""
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(f"\n$ saec run {' '.join(sets)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(saec_command() + ["run", *sets], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        killed = None
        while proc.poll() is None:
            time.sleep(0.5)
            if kill_at_checkpoint is not None and checkpoints(kill_at_checkpoint):
                time.sleep(1.0)
                os.killpg(proc.pid, signal.SIGKILL)
                killed = [p.name for p in checkpoints(kill_at_checkpoint)]
                proc.wait()
                break
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = "timeout"
                break
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "killed": killed}


def latest_run(store: Path) -> dict | None:
    runs = sorted(store.glob("runs/*/run.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(runs[-1].read_text()) if runs else None


def summarize_run(record: dict | None, out: Path, tag: str) -> dict:
    """Stage times, the reports' systems and the training summary of one run record; copies the
    reports' markdown and figures into `out`."""
    if record is None:
        return {"run": None}
    stages = {}
    for name, st in record["stages"].items():
        row = {"state": st["state"], "seconds": st.get("seconds"), "build_s": st.get("build_s")}
        ran = (st.get("info") or {}).get("run") or {}
        if isinstance(ran, dict) and ran.get("seconds") is not None:  # the model's own work, loading excluded
            row["work_s"] = round(float(ran["seconds"]), 3)
            row["images_per_s"] = ran.get("images_per_s")
        stages[name] = row
    result = {"run_id": record["run_id"], "status": record.get("status"), "wall_s": record.get("wall_s"),
              "error": record.get("error"), "stages": stages, "reports": {}}
    for name, st in record["stages"].items():
        if name.endswith("/report"):
            dataset = name.split("/")[0]
            info = st["info"]
            result["reports"][dataset] = {k: info.get(k) for k in ("systems", "notes", "counts") if k in info}
            for kind, suffix in (("markdown", ".md"), ("figure", ".png")):
                src = st["outputs"].get(kind, {}).get("path")
                if src and Path(src).is_file():
                    shutil.copy2(src, out / f"gpu_pipeline_{tag}_{dataset}{suffix}")
        if name == "train_cloud" and st["state"] == "ran":
            info = st["info"]
            keep = ("steps", "examples", "resumed_from_step", "sessions", "train_seconds", "final_loss",
                    "images_per_pass", "passes_per_step", "vision_fast_path", "peak_gpu_gb", "quantization",
                    "trainable_parameters", "val")
            result["train"] = {k: info.get(k) for k in keep}
            log = st["outputs"].get("train_log", {}).get("path")
            if log and Path(log).is_file():
                import pandas as pd

                rows = pd.read_parquet(log)
                result["train"]["log"] = rows[["step", "session", "loss", "images", "step_seconds", "images_per_s"]]\
                    .round(4).to_dict("records")
                first = rows.groupby("session").step.transform("min")
                later = rows[rows.step > first]  # the first step of each session pays its warm-up
                if len(later):
                    result["train"]["images_per_s_after_first_step"] = round(
                        float(later["images"].sum() / later["step_seconds"].sum()), 2)
    return result


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "prefect", "ultralytics", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # recorded: a missing package shows in the results
            out[name] = f"unavailable: {type(exc).__name__}"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True, help="folder holding the two weightless model folders")
    ap.add_argument("--work", type=Path, required=True, help="models, data, store and caches go here")
    ap.add_argument("--phases", default="setup,kill,resume,warm,split,edge_trained",
                    help=f"comma-separated, in order, from {','.join(PHASES)} (prime replaces kill and resume)")
    ap.add_argument("--train-steps", type=int, default=12, help="optimizer steps of training (16 images each)")
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a phase's `saec run` may take")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT or benchmarks/results)")
    ap.add_argument("--no-llava", action="store_true", help="set-up writes no LLaVA folder (runs then score no LLaVA)")
    ap.add_argument("--smoke", action="store_true", help="tiny layers, small images, on the CPU (a code check)")
    args = ap.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        ap.error(f"unknown phases {unknown}; choose from {list(PHASES)}")
    from saec.env import configure_offline

    configure_offline()
    import torch

    from machine import cpu_model  # benchmarks/machine.py

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cuda_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device = cuda_name or cpu_model()
    model = re.search(r"\b[A-Z]\d{2,4}\b", device) if cuda_name else None  # "NVIDIA H100 80GB HBM3" -> h100
    tag = "smoke" if args.smoke else (model.group(0) if model else device.split()[-1]).lower()
    out = (args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_file = work / "results.json"
    results = json.loads(state_file.read_text()) if state_file.exists() else {
        "benchmark": "gpu_pipeline", "device": device, "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
        "smoke": args.smoke, "versions": versions(), "phases": {}}
    results["phases_requested"] = phases

    def save() -> None:
        results["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        text = json.dumps(results, indent=2, default=str) + "\n"
        state_file.write_text(text)
        (out / f"gpu_pipeline_{tag}.json").write_text(text)

    env = dict(os.environ, SAEC_HOME=str(work / "home"), PYTHONUNBUFFERED="1", CI="true",
               PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    log = work / "saec.log"
    store = work / "store"
    cuda = torch.cuda.is_available()
    for phase in phases:
        t = time.perf_counter()
        print(f"== {phase}", flush=True)
        if phase == "setup":
            setup = {}
            dtype = "bfloat16" if cuda else "float32"
            dev = "cuda" if cuda else "cpu"
            setup["qwen"] = write_vlm(args.models / "Qwen2.5-VL-7B-Instruct", work / "Qwen2.5-VL-7B-Instruct", dev,
                                      dtype, SMOKE_QWEN if args.smoke else None)
            if not args.no_llava:
                setup["llava"] = write_vlm(args.models / "llava-1.5-7b-hf", work / "llava-1.5-7b-hf", dev, dtype,
                                           SMOKE_LLAVA if args.smoke else None)
            setup["edge"] = write_edge(work / "yolo11s-cls.pt")
            setup["data"] = write_data(work, args.smoke, workers=os.cpu_count() or 2)
            results["phases"]["setup"] = setup
        elif phase == "kill":
            shutil.rmtree(store, ignore_errors=True)
            ran = run_saec(overrides(work, args, store, []), env, log, kill_at_checkpoint=store, timeout=args.timeout)
            ran["checkpoints_left"] = sorted(p.name for p in checkpoints(store))
            ran["run"] = summarize_run(latest_run(store), out, "kill")
            results["phases"]["kill"] = ran
        elif phase == "resume":
            ran = run_saec(overrides(work, args, store, []), env, log, timeout=args.timeout)
            ran["run"] = summarize_run(latest_run(store), out, "resume")
            results["phases"]["resume"] = ran
        elif phase == "prime":  # instead of kill + resume: train, then SAEC on MVTec (fills the compile cache)
            shutil.rmtree(store, ignore_errors=True)
            extra = ["evaluate.datasets=[mvtec_holdout]", "evaluate.systems=[saec]"]
            ran = run_saec(overrides(work, args, store, extra), env, log, timeout=args.timeout)
            ran["run"] = summarize_run(latest_run(store), out, "prime")
            results["phases"]["prime"] = ran
        elif phase == "warm":
            adapters = sorted(store.glob("stages/train_cloud/*/adapter"))
            if not adapters:
                results["phases"]["warm"] = {"skipped": "no trained adapter in the store (run the resume phase)"}
                continue
            warm_store = work / "store-warm"
            shutil.rmtree(warm_store, ignore_errors=True)
            extra = [f"cloud.adapter={adapters[-1]}", "evaluate.datasets=[mvtec_holdout]",
                     "evaluate.systems=[saec,cloud_only]"]
            ran = run_saec(overrides(work, args, warm_store, extra), env, log, timeout=args.timeout)
            ran["run"] = summarize_run(latest_run(warm_store), out, "warm")
            results["phases"]["warm"] = ran
        elif phase in ("split", "edge_trained"):
            adapters = sorted(store.glob("stages/train_cloud/*/adapter"))
            if not adapters:
                results["phases"][phase] = {"skipped": "no trained adapter in the store (run the resume phase)"}
                continue
            phase_store = work / f"store-{phase}"
            shutil.rmtree(phase_store, ignore_errors=True)
            extra = [f"cloud.adapter={adapters[-1]}", "evaluate.datasets=[mvtec_holdout]"]
            if phase == "split":  # SAEC alone, the edge given part of the cores while the cloud decodes
                cores = os.cpu_count() or 2
                extra += ["evaluate.systems=[saec]", f"edge.threads={max(1, cores // 2)}",
                          f"edge.io_threads={max(1, cores // 4)}"]
            else:  # the edge fine-tuned in the flow from the same checkpoint: a trained edge's routing share
                extra += ["evaluate.systems=[saec,edge_only]", "edge.mode=supervised",
                          "edge.train.cache=ram"] + (["edge.train.epochs=1"] if args.smoke else [])
            ran = run_saec(overrides(work, args, phase_store, extra), env, log, timeout=args.timeout)
            ran["run"] = summarize_run(latest_run(phase_store), out, phase)
            results["phases"][phase] = ran
        results["phases"].setdefault(phase, {})["phase_seconds"] = round(time.perf_counter() - t, 1)
        save()
        print(json.dumps({phase: {k: v for k, v in results["phases"][phase].items() if k != "run"}}, default=str),
              flush=True)
    shutil.copy2(log, out / f"gpu_pipeline_{tag}.log") if log.exists() else None
    save()


if __name__ == "__main__":
    main()
