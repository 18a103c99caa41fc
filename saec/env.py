"""Process-wide settings that keep every library offline and quiet.

Imported first by the command line and by the test suite. Every value is a default:
a variable the user already set wins.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

_DONE = False


def configure_offline(home: Path | None = None) -> None:
    """Set offline/telemetry defaults for Prefect, Ultralytics, Hugging Face and OpenVINO."""
    global _DONE
    if _DONE:
        return
    home = Path(home or os.environ.get("SAEC_HOME") or Path.cwd() / ".saec").resolve()
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
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
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    _ensure_ultralytics_font(Path(os.environ["YOLO_CONFIG_DIR"]))
    _DONE = True


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
