"""bootstrap.py: the two commands of the README."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import importlib.util as u; s = u.find_spec('datasets'); print(s and s.origin)"


def _bootstrap():
    spec = importlib.util.spec_from_file_location("saec_bootstrap", ROOT / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_commands_do_not_show_the_project_folder_as_the_datasets_library():
    """From the repository root, `datasets` would resolve to the project's datasets/ folder, and Hugging
    Face code probing for its `datasets` library would find that. The commands run with the root off
    sys.path: what they see as `datasets` is the library or nothing."""
    project = str(ROOT / "datasets")
    plain = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    assert project in plain.stdout  # the hazard, as a plain `python -c` from the root sees it
    for verb in ("run", "test"):
        cmd = _bootstrap().command(verb, [])
        interpreter = [sys.executable, *cmd[1:cmd.index("-m")]]  # this interpreter, the command's flags
        seen = subprocess.run([*interpreter, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
        assert project not in seen.stdout, (verb, cmd, seen.stdout)


def test_a_failed_install_ends_in_one_line_that_names_the_fix():
    """A fresh machine with too little disk for torch's CUDA build: the set-up ends with one line that
    says how much is free and how much is needed, not a traceback; with room enough, it points at
    pip's own message."""
    boot = _bootstrap()
    short = boot.failure_line(300 * 2**20, "x86_64")
    assert "\n" not in short and "300 MB free" in short and "7.5 GB" in short and "free some space" in short
    assert "free some space" not in boot.failure_line(80 * 2**30, "x86_64")
    assert "2.5 GB" in boot.failure_line(2**30, "aarch64")
