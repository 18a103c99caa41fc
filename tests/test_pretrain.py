"""`saec pretrain` at a reduced size: the world draw, the three stand-ins trained through the cached
stages, exported with a provenance record that the exported files match."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

SMALL_WORLD = ["pretrain.world.n_train_good=6", "pretrain.world.n_test_good=2", "pretrain.world.n_test_defect_per_type=4",
               "pretrain.world.ksdd2_n_train=4", "pretrain.world.ksdd2_n_test=4",
               "pretrain.cloud.epochs=1", "pretrain.cloud.max_steps=2", "pretrain.llava.epochs=1",
               "pretrain.llava.max_steps=2", "pretrain.edge.epochs=1"]


def test_pretrain_exports_stand_ins_with_a_provenance_they_match(prefect_server, tmp_path):
    from saec.cli import app
    from saec.flows.pretrain import PROVENANCE, verify_pretrained
    from saec.tasks.cloud.config import ModelLoadConfig
    from saec.tasks.cloud.models import load_vlm
    from saec.tasks.edge.model import load_classifier

    out = tmp_path / "pretrained"
    args = [a for s in [*SMALL_WORLD, f"store.root={tmp_path / 'store'}"] for a in ("--set", s)]
    result = CliRunner().invoke(app, ["pretrain", str(out), *args])
    assert result.exit_code == 0, result.output
    record = json.loads((out / PROVENANCE).read_text())
    assert record["world"]["categories"] == ["tile", "leather", "pill"] and record["world"]["seed"] == 7
    assert record["recipes"]["qwen"]["trainable"] == "full" and record["code_version"]
    assert record["metrics_on_world_val"]["qwen"]["n"] > 0
    assert verify_pretrained(out) == []
    assert "pretrained stand-in" in (out / "llava" / "README.md").read_text()  # not the random model's card
    # what was exported loads as what it stands for
    assert load_vlm(ModelLoadConfig(model=str(out / "qwen"))).family == "qwen2_5_vl"
    assert load_vlm(ModelLoadConfig(model=str(out / "llava"))).family == "llava"
    assert load_classifier(out / "edge" / "model.json").num_classes == 2
    # a changed byte is caught
    weights = out / "qwen" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert verify_pretrained(out) == ["qwen/model.safetensors: its content differs from the record"]
    # a world that reuses an evaluated category is refused before any work
    bad = CliRunner().invoke(app, ["pretrain", str(tmp_path / "x"), "--set", "pretrain.world.categories=[tile, carpet]"])
    assert bad.exit_code == 2 and "which the embedded evaluation uses" in bad.output


def test_the_shipped_stand_ins_are_the_files_their_provenance_records():
    """The pretrained stand-ins in the package match, file for file, the record of how they were
    made; the record names a world that shares nothing with the embedded evaluation."""
    from saec.datasets.synthetic import DEFAULT_CATEGORIES
    from saec.flows.pretrain import EXPORTED, PROVENANCE, verify_pretrained

    shipped = Path(__file__).resolve().parents[1] / "saec" / "pretrained"
    record = json.loads((shipped / PROVENANCE).read_text())
    assert verify_pretrained(shipped) == []
    assert {name.split("/")[0] for name in record["files"]} == set(EXPORTED)
    assert set(record["world"]["categories"]).isdisjoint(DEFAULT_CATEGORIES)
    assert all(f["bytes"] < 16 * 2**20 for f in record["files"].values())  # a few MB each
