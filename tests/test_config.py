"""The configuration: one merge rule at any depth, every mistake refused before any work starts."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from saec.config import ConfigError, PipelineConfig, load_config


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _leaves(value, path + ".")
        else:
            out.append((path, value))
    return out


DEFAULT = load_config(None, []).model_dump(mode="json")
LEAVES = [(k, v) for k, v in _leaves(DEFAULT) if k != "store.root"]


def _nested(dotted: str, value: object) -> dict:
    tree: dict = {}
    node = tree
    *parents, last = dotted.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value
    return tree


def test_every_field_at_every_depth_can_be_set_alone(tmp_path):
    """Setting any one field to its default value, by --set or by YAML, leaves the whole configuration as it was.

    A merge that replaced a section by the model's own defaults (the embedded synthetic draw's
    128 px and 6x visibility by 256 px and 1x, the baselines' 448 px by nothing) fails here.
    """
    assert len(LEAVES) > 100
    sections = {k.split(".")[0] for k, _ in LEAVES}
    assert sections == set(PipelineConfig.model_fields) - {"store"}
    for dotted, value in LEAVES:
        assert load_config(None, [f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
                           ).model_dump(mode="json") == DEFAULT, dotted  # fmt: skip
        path = tmp_path / "one.yaml"
        path.write_text(yaml.safe_dump(_nested(dotted, value)))
        assert load_config(path).model_dump(mode="json") == DEFAULT, dotted


def test_one_field_changes_that_field_only():
    cfg = load_config(None, ["data.synthetic.seed=31", "cloud.baseline_score.batch_size=8", "routing.smax_thr=0.9"])
    got = dict(_leaves(cfg.model_dump(mode="json")))
    changed = {k for k, v in _leaves(DEFAULT) if got[k] != v}
    assert changed == {"data.synthetic.seed", "cloud.baseline_score.batch_size", "routing.smax_thr"}
    assert cfg.routing.cloud_thr == 0.5  # the embedded model's threshold still applies: cloud_thr was not set


@pytest.mark.parametrize("overrides, says", [
    (["cloud.train.epochs=0"], "cloud.train.epochs: Input should be greater than or equal to 1"),
    (["cloud.score.batch_size=x"], "cloud.score.batch_size"),
    (["cloud.model=/nonexistent/qwen"], "cloud.model=/nonexistent/qwen does not exist"),
    (["cloud.llava_model=/nonexistent/llava"], "cloud.llava_model=/nonexistent/llava does not exist"),
    (["faults.fail_before=[bogus-stage]"], "unknown stage(s) ['bogus-stage']"),
    (["faults.fail_before=[once:bogus]"], "unknown stage(s) ['once:bogus']"),
    (["edge.weights=/nonexistent.pt"], "does not exist"),
    (["data.source=folders", "data.mvtec_root=/nonexistent"], "data.mvtec_root=/nonexistent is not an existing folder"),
    (["holdout.n_good=-1"], "holdout.n_good"),
    (["routing.cloud_thr=1.5"], "routing.cloud_thr"),
    (["nonsense.field=1"], "nonsense"),
])  # fmt: skip
def test_mistakes_are_refused_with_their_full_path(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert says in str(err.value)


def test_model_and_adapter_folders_are_checked_before_any_work(tmp_path):
    weightless = tmp_path / "qwen"
    weightless.mkdir()
    (weightless / "config.json").write_text("{}")
    (weightless / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(ConfigError, match="lacks 1 of the 1 weight shards"):
        load_config(None, [f"cloud.model={weightless}"])
    (weightless / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert load_config(None, [f"cloud.model={weightless}"]).cloud.model == str(weightless)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        load_config(None, [f"cloud.adapter={adapter}"])
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no .*safetensors adapter weights"):
        load_config(None, [f"cloud.adapter={adapter}"])
    assert load_config(None, ["cloud.model=Qwen/Qwen2.5-VL-7B-Instruct"]).cloud.model  # a hub id: looked up when loaded


def test_hostile_yaml_files_are_refused_at_once(tmp_path):
    bad_utf8 = tmp_path / "latin1.yaml"
    bad_utf8.write_bytes("holdout:\n  n_good: 3 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(bad_utf8)
    dup = tmp_path / "dup.yaml"
    dup.write_text("holdout:\n  n_good: 3\n  n_good: 4\n")
    with pytest.raises(ConfigError, match="'n_good' appears twice"):
        load_config(dup)
    bomb = tmp_path / "bomb.yaml"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, (prev, name) in enumerate(zip("abcdef", "bcdefg")):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(bomb)
    assert time.perf_counter() - t0 < 5 and len(str(err.value)) < 300
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20))
    with pytest.raises(ConfigError, match="at most"):
        load_config(big)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["holdout.n_good=[1"])
    not_a_map = tmp_path / "list.yaml"
    not_a_map.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(not_a_map)
    assert not Path(tmp_path / "missing.yaml").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_the_command_line_refuses_a_wrong_configuration_with_exit_2_and_no_traceback(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "saec.cli", "config", "--set", "holdout.n_good=-1"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "holdout.n_good" in done.stdout and "Traceback" not in done.stdout + done.stderr
    usage = subprocess.run([sys.executable, "-m", "saec.cli", "prepare", "--no-such-option"], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert usage.returncode == 2 and "No such option" in usage.stdout + usage.stderr
    assert "Traceback" not in usage.stdout + usage.stderr
    shards = subprocess.run([sys.executable, "-m", "saec.cli", "run", "--edge-shards", "2", "--set", f"store.root={tmp_path}"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shards.returncode == 2 and "add --distributed" in shards.stdout and not list(tmp_path.iterdir())


def test_one_cloud_verdict_threshold_for_scores_decisions_and_metrics():
    """The scores table's verdicts are taken at routing.cloud_thr, the threshold the decisions use;
    a scoring threshold that differs from it is refused before any work."""
    from saec.config import PipelineConfig, load_config

    embedded = PipelineConfig()
    assert embedded.score_config("m").threshold == embedded.routing.cloud_thr
    assert embedded.score_config("m", baseline=True).threshold == embedded.routing.cloud_thr
    tuned = load_config(None, ["routing.cloud_thr=0.3"])
    assert tuned.score_config("m").threshold == 0.3 == tuned.score_config("m", baseline=True).threshold
    assert load_config(None, ["routing.cloud_thr=0.3", "cloud.score.threshold=0.3"]).score_config("m").threshold == 0.3
    # the threshold keys a scoring stage only where it decides something there: which images get explained
    assert tuned.score_config("m").cache_key_view() == embedded.score_config("m").cache_key_view()
    explained = [load_config(None, [f"routing.cloud_thr={t}", "cloud.score.explain=true"]).score_config("m")
                 for t in (0.3, 0.4)]
    assert explained[0].cache_key_view() != explained[1].cache_key_view()
    with pytest.raises(ConfigError, match=r"cloud.score.threshold=0.26 differs from routing.cloud_thr=0.3"):
        load_config(None, ["routing.cloud_thr=0.3", "cloud.score.threshold=0.26"])


def test_bitsandbytes_offline_kernel_lookup_is_not_shown(tmp_path):
    """Importing bitsandbytes on a CPU machine offline logs a failed kernel download that nobody can
    act on; after configure_offline it stays silent, and an error from the same logger still shows."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    code = ("import logging, sys\nfrom saec.env import configure_offline\nconfigure_offline()\n"
            "import bitsandbytes\nlogging.getLogger('bitsandbytes.backends.cpu.ops').error('a real error')\n")
    out = {}
    for quiet in (False, True):
        text = code.replace("configure_offline()\n", "configure_offline()\n" if quiet else "")
        out[quiet] = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, timeout=120).stderr
    assert "a real error" in out[True] and "gemm_4bit_forward" not in out[True]
    if "gemm_4bit_forward" not in out[False]:
        pytest.skip("this bitsandbytes does not look for the CPU kernel")
