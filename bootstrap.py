#!/usr/bin/env python3
"""Set up a project-local virtual environment, then run the pipeline or the tests.

    python3 bootstrap.py run    # the whole pipeline on the embedded default
    python3 bootstrap.py test   # the test suite

Needs only python3 (3.11 or newer). The environment lives in `.venv/` and is
reinstalled only when `pyproject.toml` changes. Extra arguments are passed on
(`python3 bootstrap.py test -k holdout`, `python3 bootstrap.py run --help`).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".saec-installed"

# torchvision must match torch exactly; these pairs import together.
TORCH_PINS = {
    "x86_64": ["torch==2.14.1", "torchvision==0.29.1"],
    "aarch64": ["torch==2.9.1", "torchvision==0.24.1"],
}
# What a finished .venv takes on disk, measured: x86_64 gets torch's CUDA build from PyPI.
VENV_GB = {"x86_64": 7.5, "aarch64": 2.5}


def _python() -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / "python"


def _say(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def _pip(*args: str) -> None:
    cmd = [str(_python()), "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir", *args]
    _say(" ".join(cmd[3:]))
    if subprocess.run(cmd).returncode != 0:
        sys.exit(failure_line(shutil.disk_usage(VENV).free))


def failure_line(free_bytes: int, machine: str | None = None) -> str:
    """The one line a failed install ends with. Less free space than the environment takes (the CUDA
    build of torch is several GB) is named with what is needed; otherwise pip's own message above
    says why."""
    need = VENV_GB.get(machine or platform.machine(), 7.5)
    if free_bytes < need * 2**30:
        return (f"[bootstrap] set-up failed: {free_bytes / 2**20:.0f} MB free on the disk of {VENV}; "
                f"the environment needs about {need} GB: free some space and run this command again.")
    return "[bootstrap] set-up failed: pip's message above says why; fix that and run this command again."


def ensure_env() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"SAEC needs Python 3.11 or newer; this is {platform.python_version()}.")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted and _python().exists():
        return
    if not _python().exists():
        _say(f"creating {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    _pip("-q", *TORCH_PINS.get(platform.machine(), ["torch", "torchvision"]))
    _pip("-q", "-e", f"{ROOT}[dev]")
    STAMP.write_text(wanted)
    _say("environment ready")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "test", "setup"}:
        print(__doc__)
        return 2
    ensure_env()
    verb, rest = argv[0], argv[1:]
    if verb == "setup":
        return 0
    return subprocess.run(command(verb, rest), cwd=ROOT).returncode


def command(verb: str, rest: list[str]) -> list[str]:
    """The command of `run` or `test`. `-P` keeps the repository root off `sys.path`: its `datasets/`
    folder (installed as `saec.datasets`) must not pass for Hugging Face's `datasets` library when a
    library probes for that."""
    if verb == "run":
        return [str(_python()), "-P", "-m", "saec.cli", "run", *rest]
    return [str(_python()), "-P", "-m", "pytest", *rest]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
