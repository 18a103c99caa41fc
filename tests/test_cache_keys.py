"""Cache keys see the code each stage runs and nothing else, and files by their content.

The code part of a key is computed from the source (`saec.artifacts.code`). These tests edit a
copy of the project's source and ask a fresh interpreter, which imports that copy, for every
stage's code version:

* comments, docstrings and blank lines added to every module change no key;
* a statement added to one function of a module changes exactly the keys of the stages that
  run that module's code (each expected set is stated below);
* the copy, run through `saec prepare`, re-runs only the scans after an edit to the scan code.

A weights file named in the configuration is keyed by its bytes: replaced in place, same path
and same size, it changes the edge stages' keys.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL_PIPELINE

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "datasets", "artifacts", "deployments")  # installed as saec.<name>

# A statement added to the first function of each module, and the stages that must re-run.
EXPECTED = {
    "saec/prompts.py": {"build-sft", "build-tiny-vlm", "build-tiny-llava", "train-cloud", "score-cloud"},
    "tasks/cloud/fast.py": {"train-cloud", "score-cloud"},
    "datasets/scan.py": {"scan-mvtec", "scan-ksdd2"},
    "tasks/edge/preprocess.py": {"train-edge", "predict-edge", "complexity"},
}

CODES = """
import json, sys
from pathlib import Path
from saec.env import configure_offline
configure_offline()
import saec.tasks.stage, saec.flows.pipeline  # declares every stage
from saec.artifacts.code import code_identity
from saec.artifacts.hashing import hash_obj
from saec.tasks.stage import STAGES, library_versions
assert saec.tasks.stage.__file__.startswith({src!r}), saec.tasks.stage.__file__

def codes():  # as Stage.code computes it, afresh
    return {{n: hash_obj({{"code": code_identity(s.fn), "libraries": library_versions()}})[:16] for n, s in STAGES.items()}}

out = {{"": codes()}}
for path, text in json.loads(Path(sys.argv[1]).read_text()).items():  # one edit at a time
    original = Path(path).read_text()
    Path(path).write_text(text)
    out[path] = codes()
    Path(path).write_text(original)
print(json.dumps(out))
"""


def copy_project(dest: Path) -> Path:
    """The package as installed (`saec`, `saec.tasks`, ...), copied under dest/src; returns dest/src."""
    src = dest / "src"
    (src / "saec").mkdir(parents=True)
    for f in (ROOT / "saec").glob("*.py"):
        shutil.copy2(f, src / "saec" / f.name)
    shutil.copytree(ROOT / "saec" / "pretrained", src / "saec" / "pretrained")  # package data: the stand-ins
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / "saec" / name, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _file(src: Path, rel: str) -> Path:
    return src / (rel if rel.startswith("saec/") else f"saec/{rel}")


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}


def stage_codes(src: Path, edits: dict[Path, str] | None = None) -> dict[str, dict[str, str]]:
    """Every stage's code version in a fresh interpreter that imports `src`: {"": as is, file: with that edit}."""
    plan = src.parent / "edits.json"
    plan.write_text(json.dumps({str(k): v for k, v in (edits or {}).items()}))
    done = subprocess.run([sys.executable, "-c", CODES.format(src=str(src)), str(plan)], env=_env(src), capture_output=True,
                          text=True, timeout=300, cwd=src)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cosmetic_edit(text: str) -> str:
    """Every docstring reworded, comments and blank lines added: the code itself unchanged."""
    tree = ast.parse(text)
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                spans.append(first)
    lines = text.splitlines(keepends=True)
    for node in sorted(spans, key=lambda n: n.lineno, reverse=True):
        indent = lines[node.lineno - 1][: node.col_offset]
        lines[node.lineno - 1 : node.end_lineno] = [f'{indent}"""Reworded: {node.lineno}."""  # a comment\n']
    body = "".join(lines)
    return "# a comment at the top\n\n" + body.replace("\n\n\n", "\n\n\n\n", 3) + "\n# and one at the end\n"


def body_edit(text: str) -> str:
    """A statement added at the start of the first function's body (after its docstring)."""
    tree = ast.parse(text)
    fn = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    first = fn.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    anchor = fn.body[1] if has_doc and len(fn.body) > 1 else first
    lines = text.splitlines(keepends=True)
    indent = lines[anchor.lineno - 1][: anchor.col_offset]
    lines.insert(anchor.lineno - 1, f"{indent}_edited = None\n")
    return "".join(lines)


def test_comments_docstrings_and_blank_lines_change_no_key(tmp_path):
    src = copy_project(tmp_path / "as-is")
    before = stage_codes(src)[""]
    edited = copy_project(tmp_path / "edited")
    modules = sorted(edited.rglob("*.py"))
    assert len(modules) > 40
    for path in modules:
        path.write_text(cosmetic_edit(path.read_text()))
    ast.parse(_file(edited, "tasks/stage.py").read_text())  # the edits keep every module valid
    assert stage_codes(edited)[""] == before


def test_a_body_edit_changes_exactly_the_keys_of_the_stages_that_run_it(tmp_path):
    src = copy_project(tmp_path)
    edits = {_file(src, module): body_edit(_file(src, module).read_text()) for module in EXPECTED}
    codes = stage_codes(src, edits)
    before = codes[""]
    for module, expected in EXPECTED.items():
        after = codes[str(_file(src, module))]
        assert set(after) == set(before)
        assert {name for name in before if after[name] != before[name]} == expected, module


PREPARE = [*SMALL_PIPELINE[:6]]


def _prepare(src: Path, store: Path, home: Path) -> dict[str, str]:
    env = _env(src) | {"HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "SAEC_HOME": str(home / "saec")}
    env.pop("PREFECT_API_URL", None)
    args = [a for item in [*PREPARE, f"store.root={store}"] for a in ("--set", item)]
    done = subprocess.run([sys.executable, "-m", "saec.cli", "prepare", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=src)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = sorted((store / "runs").glob("*/run.json"), key=lambda p: json.loads(p.read_text())["started"] + p.parent.name)
    return {name: st["state"] for name, st in json.loads(runs[-1].read_text())["stages"].items()}


@pytest.mark.slow
def test_after_an_edit_to_the_scan_code_prepare_reruns_the_scans_only(tmp_path):
    src = copy_project(tmp_path / "project")
    store, home = tmp_path / "store", tmp_path / "home"
    first = _prepare(src, store, home)
    assert set(first.values()) == {"ran"}
    path = _file(src, "datasets/scan.py")
    path.write_text(cosmetic_edit(path.read_text()))
    assert set(_prepare(src, store, home).values()) == {"cached"}
    path.write_text(body_edit(path.read_text()))
    again = _prepare(src, store, home)
    assert {n for n, s in again.items() if s == "ran"} == {"scan_mvtec", "scan_ksdd2"}
    assert {n for n, s in again.items() if s == "cached"} == set(first) - {"scan_mvtec", "scan_ksdd2"}


def test_edge_weights_are_keyed_by_their_bytes(tmp_path):
    from saec.artifacts.store import Store
    from saec.tasks.edge.config import EdgeConfig
    from saec.tasks.edge.task import predict_edge_task, train_edge_task
    from saec.tasks.stage import stage_of

    weights = tmp_path / "edge.pt"
    weights.write_bytes(b"A" * 1000)
    sft = Store(tmp_path / "store").build_stage("sft", "k", lambda out: ({"m": _write(out / "m.txt")}, {}))
    cfg = EdgeConfig(weights=str(weights))
    train = dict(sft=sft, cfg=cfg)
    predict = dict(images=sft, table="m", trained=None, sft=sft, cfg=cfg, telemetry={}, label="x")
    keys = stage_of(train_edge_task).key(train), stage_of(predict_edge_task).key(predict)
    moved = tmp_path / "elsewhere" / "edge.pt"
    moved.parent.mkdir()
    shutil.copy2(weights, moved)  # the same bytes at another path: the same keys
    cfg_moved = EdgeConfig(weights=str(moved))
    assert stage_of(train_edge_task).key(train | {"cfg": cfg_moved}) == keys[0]
    weights.write_bytes(b"B" * 1000)  # replaced in place: same path, same size
    assert stage_of(train_edge_task).key(train) != keys[0]
    assert stage_of(predict_edge_task).key(predict) != keys[1]
    # what only observes a stage is not keyed
    assert stage_of(predict_edge_task).key(predict | {"label": "other"}) == stage_of(predict_edge_task).key(predict)


def _write(path: Path) -> Path:
    path.write_text("x")
    return path


class _ParsesWhenCollected:
    """Cyclic garbage whose finalizer builds a syntax tree, as another thread of the process may
    do at any moment (Prefect's threads, a user's): it runs inside the next parse's allocations."""

    def __del__(self):
        ast.parse("x = [1, (2, {3: 4})]")


def test_code_versions_survive_a_tree_built_elsewhere_during_their_parse():
    import gc

    from saec.artifacts import code

    source = (ROOT / "tasks" / "stage.py").read_text()
    got = {}
    for name, parse in (("ast.parse", ast.parse), ("code.parse", code.parse)):
        garbage = _ParsesWhenCollected()
        garbage.cycle = garbage
        del garbage
        threshold = gc.get_threshold()
        gc.set_threshold(1)  # collect at the first allocation of the parse
        try:
            got[name] = ast.dump(parse(source))
        except SystemError as exc:  # CPython 3.11's shared recursion counter (python/cpython#106905)
            got[name] = exc
        finally:
            gc.set_threshold(*threshold)
    if not isinstance(got["ast.parse"], SystemError):
        pytest.skip(f"Python {sys.version.split()[0]} does not show the hazard")
    assert got["code.parse"] == ast.dump(ast.parse(source))


def test_what_a_stage_holds_loaded_at_run_time_is_not_part_of_its_code():
    """The cloud stages keep loaded scorers between tasks (and SAEC preloads one in the background):
    their cache key must be the same whether a scorer is loaded when it is computed or not. (It was
    not when the loaded scorers sat in a module-level dict: a stage keyed while the preload held a
    model got another key than the same stage in a process that loaded nothing.)"""
    from saec.artifacts.code import code_identity
    from saec.tasks.cloud import task

    empty = code_identity(task.score_cloud.fn)
    task._LOADED._scorers["a scorer's config"] = object()  # what a load leaves, without loading
    try:
        assert code_identity(task.score_cloud.fn) == empty
    finally:
        task.release_models()


def test_a_key_from_the_arguments_a_caller_gives_is_the_key_the_task_computes(tmp_path, prefect_server):
    """A placement or a lookup computes a stage's key from the arguments given; the task binds
    every parameter, defaults included. Both must be one key (a sharded stage's `shard=None` was not)."""
    from saec.tasks.stage import Built, stage, stage_of

    @stage("keyed_default_demo", task="keyed-default-demo")
    def demo(out: Path, x: int, part: int | None = None) -> Built:
        (out / "v.txt").write_text(f"{x} {part}")
        return {"v": out / "v.txt"}, {}

    built = demo(store=str(tmp_path), x=1)
    assert built.key == stage_of(demo).key({"store": str(tmp_path), "x": 1})
    assert stage_of(demo).lookup(str(tmp_path), {"x": 1}) is not None
    assert built.key != stage_of(demo).key({"x": 1, "part": 2})
