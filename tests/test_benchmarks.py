"""The benchmark scripts run end to end in their smallest settings and write the results they promise.

Nothing else exercises them, and they call the project's internals directly, so a change there
can break one silently. These are code checks, not measurements: no speed is asserted.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODELS, MODELS_SKIP

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def recipes_module():
    """benchmarks/cloud_recipes.py, loaded from its file (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("saec_bench_cloud_recipes", BENCH / "cloud_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(script: str, *args: str, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a benchmark script; it must succeed (or, with ok=False, must fail)."""
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode != 0, f"{script} succeeded where it should fail:\n{proc.stdout[-3000:]}"
    return proc


@pytest.mark.slow
def test_edge_cpu_benchmark(tmp_path):
    out = tmp_path / "edge.json"
    bench("edge_cpu.py", "--n", "16", "--imgsz", "128", "--repeats", "1", "--work", str(tmp_path / "w"),
          "--out", str(out))
    rec = json.loads(out.read_text())
    (row,) = rec["results"]
    assert row["imgsz"] == 128 and row["n_images"] == 16
    assert row["baseline_images_per_s"] > 0 and row["ours_images_per_s"] > 0
    # the exported graph must give the same verdicts as plain Ultralytics on every image
    assert row["verdict_agreement_vs_baseline"] == 1.0
    assert rec["machine"]["cpu"]


@pytest.mark.slow
def test_cloud_cpu_train_benchmark(tmp_path):
    out = tmp_path / "train.json"
    bench("cloud_cpu_train.py", "--steps", "3", "--repeats", "1", "--out", str(out))
    rec = json.loads(out.read_text())
    assert set(rec["best_images_per_s"]) == {"inline", "prefetch_threads"}
    assert all(v > 0 for v in rec["best_images_per_s"].values())
    assert rec["steps"] == 3 and rec["train_vlm_images_per_s"] > 0


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not (MODELS / "Qwen2.5-VL-7B-Instruct" / "config.json").is_file()
                    or not (MODELS / "llava-1.5-7b-hf" / "config.json").is_file(),
                    reason=MODELS_SKIP)
def test_cloud_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    bench("cloud_gpu.py", "--smoke", "--models", str(MODELS), "--out", str(out))
    rec = json.loads(out.read_text())
    assert rec["errors"] == []
    assert {r["variant"] for r in rec["scoring"]} >= {"plain", "fast"}
    assert {r["variant"] for r in rec["training"]} == {"qlora_nf4_fast", "plain_hf_lora_bf16"}
    # the engine's fast path scores what the plain forward scores
    assert all(r["p_defect_max_abs_diff_fast_vs_plain"] < 1e-4 for r in rec["numerics"])


def test_recipe_study_runs_are_valid_configs(tmp_path):
    from saec.tasks.cloud.config import CloudTrainConfig, TinyModelConfig

    for study, runs in recipes_module().STUDIES.items():
        assert len({(r[0], r[1]) for r in runs}) == len(runs), f"{study} names a run twice"
        for name, seed, train_over, tiny_over, k in runs:
            tiny = TinyModelConfig(**tiny_over)
            CloudTrainConfig.tiny(tmp_path, seed=seed, resize=tiny.image_size, **train_over)
            assert k in (None, 1, 2, 4)
            assert "epochs" in train_over, f"{study}/{name} trains for whatever CloudTrainConfig.tiny says today"


@pytest.mark.slow
def test_recipe_study_draw_regen_and_run(tmp_path):
    subset = recipes_module().subset

    draw = tmp_path / "draw"
    bench("cloud_recipes.py", "draw", str(draw), "--categories", "carpet")
    meta = json.loads((draw / "meta.json").read_text())
    assert meta["synthetic"]["seed"] == 31 and meta["synthetic"]["categories"] == ["carpet"]
    assert (meta["sft_train"], meta["holdout"], meta["holdout_defects"]) == (160, 160, 80)

    # re-rendering reproduces every listed file byte for byte ...
    assert "all identical" in bench("cloud_recipes.py", "regen", str(draw)).stdout
    # ... and says so when it does not
    meta["synthetic"]["seed"] = 32
    (draw / "meta.json").write_text(json.dumps(meta))
    assert "differ from the draw's lists" in bench("cloud_recipes.py", "regen", str(draw), ok=False).stderr
    meta["synthetic"]["seed"] = 31
    (draw / "meta.json").write_text(json.dumps(meta))
    bench("cloud_recipes.py", "regen", str(draw))

    # part of a study never lands in the study's committed results file by default
    partial = bench("cloud_recipes.py", "run", str(draw), "--study", "data", "--only", "x1_24ep:42", ok=False)
    assert "name its results file with --out" in partial.stderr

    out = tmp_path / "study.json"
    bench("cloud_recipes.py", "run", str(draw), "--study", "data", "--only", "x1_24ep:42", "--epochs", "1",
          "--workers", "1", "--work", str(tmp_path / "work"), "--out", str(out))
    rec = json.loads(out.read_text())
    assert rec["epochs_override"] == 1 and rec["draw"]["holdout"] == 160
    (run,) = rec["runs"]
    # the study's pinned recipe, with --epochs over it
    assert run["name"] == "x1_24ep" and run["train_overrides"] == {"trainable": "lora+vision", "train_output_layer": True,
                                                                   "epochs": 1, "augment_lighting": 0.0}
    # scale 1 keeps at most 80 goods per category and 20 images per defect type of the SFT list
    listed = [json.loads(line) for line in open(draw / "sft_train.jsonl")]
    assert run["train_images"] == len(subset(listed, 1)) < len(listed) == 160
    for key in ("holdout_acc_at_0_5", "holdout_acc_at_0_26", "holdout_auroc", "train_acc_at_0_5",
                "holdout_tta_acc_at_0_5", "holdout_tta_acc_at_0_26", "holdout_tta_auroc"):
        assert 0.0 <= run[key] <= 1.0
    assert set(run["holdout_tta_by_type_at_0_5"]) == set(run["holdout_by_type_at_0_5"])  # a carpet-only draw
    # a run that fails is recorded as failed, and the study exits non-zero
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text((draw / "meta.json").read_text())  # no SFT or holdout list
    out2 = tmp_path / "study2.json"
    failed = bench("cloud_recipes.py", "run", str(broken), "--study", "data", "--only", "x1_24ep:7",
                   "--work", str(tmp_path / "work"), "--out", str(out2), ok=False)
    assert "1 run(s) failed: x1_24ep:7" in failed.stderr
    assert json.loads(out2.read_text())["runs"][0]["failed"] is True
    assert set(run["holdout_by_type_at_0_5"]) == {"carpet/good", "carpet/color", "carpet/cut", "carpet/hole",
                                                  "carpet/thread"}
