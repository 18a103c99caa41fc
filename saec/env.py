"""Process-wide settings that keep every library offline and quiet.

Imported first by the command line and by the test suite. Every value is a default:
a variable the user already set wins. What SAEC itself keeps outside the artifact store
(Ultralytics' settings and font) goes to `$SAEC_HOME`, by default `~/.cache/saec`.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

_DONE = False


def configure_offline(home: Path | None = None) -> None:
    """Set offline/telemetry defaults for Prefect, Ultralytics, Hugging Face and OpenVINO."""
    global _DONE
    if _DONE:
        return
    home = Path(home or os.environ.get("SAEC_HOME") or default_home()).expanduser().resolve()
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # The artifact store is the cache: Prefect keeps no result records (they would be pickles).
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
        # Prefect allows its ephemeral server 20 s to start; the first start after installing
        # (its database created and migrated) can take longer than that on a small machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "0",
        "YOLO_VERBOSE": "False",
        "YOLO_CONFIG_DIR": str(home / "ultralytics"),
        # ONNX Runtime writes a device id and session files for its telemetry unless told not to
        "ORT_DISABLE_TELEMETRY": "1",
        # compiled kernels (the cloud engine's fast path) are cached here, not in /tmp
        "TORCHINDUCTOR_CACHE_DIR": str(home / "torchinductor"),
        "TRITON_CACHE_DIR": str(home / "triton"),
        # Ultralytics sets OMP_NUM_THREADS=1 when it is imported, unless it is set: every later
        # torch computation of the process would then run on one core
        "OMP_NUM_THREADS": str(available_cores()),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    _ensure_ultralytics_font(Path(os.environ["YOLO_CONFIG_DIR"]))
    # bitsandbytes, imported on a CPU machine, looks for an optional 4-bit CPU kernel on the Hugging
    # Face Hub and logs two warnings when offline. Nothing here runs 4-bit on a CPU (NF4 is for CUDA,
    # quantization=auto), so they tell a user nothing to act on; errors still show.
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _DONE = True


def available_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def pin_torch_threads() -> None:
    """Set torch's CPU threads to every usable core, explicitly.

    A process's thread setting has a history that changes floating-point results: Ultralytics'
    trainer leaves one thread, and a pool set to n threads computes other results than the pool
    torch starts with. A stage that computes with torch calls this first, so that what it computes
    does not depend on what ran before it in the same process.
    """
    import torch

    torch.set_num_threads(available_cores())


def default_home() -> Path:
    """`$XDG_CACHE_HOME/saec`, or `~/.cache/saec`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saec"


def start_prefect_api() -> None:
    """Start Prefect's temporary local server now, one process at a time per Prefect home.

    Without PREFECT_API_URL every process starts its own server on the database in
    PREFECT_HOME, creating or migrating it first; two processes doing that at once can
    break each other's migration. A file lock in PREFECT_HOME makes them take turns; once
    the database is current, each start is quick. With PREFECT_API_URL set nothing is done.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return
    from filelock import FileLock
    from prefect.client.orchestration import get_client

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / ".saec-server-start.lock"), timeout=900):
        with get_client(sync_client=True) as client:  # starts the server and waits until it answers
            client.api_healthcheck()


def _ensure_ultralytics_font(config_dir: Path) -> None:
    """Ultralytics downloads Arial.ttf on first plot unless one is present; give it a local TTF."""
    target = config_dir / "Ultralytics" / "Arial.ttf"
    if target.exists():
        return
    try:
        import matplotlib

        font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except Exception:  # matplotlib missing: Ultralytics then only fails when it plots
        return
    if font.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(font, target)
        unicode_target = target.with_name("Arial.Unicode.ttf")
        if not unicode_target.exists():
            shutil.copyfile(font, unicode_target)
