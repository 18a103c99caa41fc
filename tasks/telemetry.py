"""Background telemetry: one sample row every `interval_s` while a system runs.

Sources, each used only where the machine exposes it:
- NVML (nvidia-ml-py): GPU utilisation, power draw and memory of one GPU;
- psutil: CPU utilisation and resident memory of this process and its children;
- RAPL (/sys/class/powercap/intel-rapl:*): cumulative CPU package energy.

Energy is integrated from what was measured: GPU power over time (trapezoids)
and the RAPL counter's increase. Nothing is estimated; the summary lists which
sources were counted, and energy is None where none was.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from pydantic import BaseModel, ConfigDict, Field

RAPL_ROOT = Path("/sys/class/powercap")


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interval_s: float = Field(0.2, gt=0.0, le=60.0)
    gpu_index: int = Field(0, ge=0)


def _rapl_packages() -> list[tuple[Path, int]]:
    """(energy_uj file, wrap-around range) of each readable CPU package domain."""
    out = []
    for dom in sorted(RAPL_ROOT.glob("intel-rapl:*")):
        if dom.name.count(":") != 1:  # sub-domains (core, uncore, dram) are inside the package figure
            continue
        f = dom / "energy_uj"
        try:
            int(f.read_text())
            rng = int((dom / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue
        out.append((f, rng))
    return out


class _NVML:
    def __init__(self, index: int):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.name = pynvml.nvmlDeviceGetName(self.handle)
        except Exception as exc:  # no driver, no GPU: recorded, not fatal
            self.error = f"{type(exc).__name__}: {exc}"

    def read(self) -> tuple[float, float, float]:
        nv, h = self.nv, self.handle
        util = nv.nvmlDeviceGetUtilizationRates(h).gpu
        power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        mem = nv.nvmlDeviceGetMemoryInfo(h).used
        return float(util), float(power), float(mem)


@dataclass
class Sampler:
    """Start it, run the work, stop it: `stop()` returns the samples as a DataFrame."""

    cfg: TelemetryConfig = field(default_factory=TelemetryConfig)
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="saec-telemetry", daemon=True)
        self._proc = psutil.Process()
        self._gpu = _NVML(self.cfg.gpu_index)
        self._rapl = _rapl_packages()
        self._rapl_last: list[int] = []
        self._rapl_total = 0

    @property
    def sources(self) -> list[str]:
        out = ["psutil"]
        if self._gpu.handle is not None:
            out.append("nvml")
        if self._rapl:
            out.append("rapl")
        return out

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self._proc, *self._proc.children(recursive=True)]
        except psutil.Error:
            return [self._proc]

    def _sample(self) -> dict:
        cpu = rss = 0.0
        for p in self._tree():
            try:
                cpu += p.cpu_percent(None)
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        row = {"t": time.perf_counter() - self._t0, "cpu_percent": cpu, "rss_bytes": rss}
        if self._gpu.handle is not None:
            row["gpu_util"], row["gpu_power_w"], row["gpu_mem_bytes"] = self._gpu.read()
        if self._rapl:
            now = [int(f.read_text()) for f, _ in self._rapl]
            if self._rapl_last:
                for (_, rng), a, b in zip(self._rapl, self._rapl_last, now):
                    self._rapl_total += b - a if b >= a else b + rng - a  # counter wrapped
            self._rapl_last = now
            row["cpu_energy_j"] = self._rapl_total / 1e6
        return row

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.rows.append(self._sample())
            self._stop.wait(self.cfg.interval_s)

    def start(self) -> "Sampler":
        self._t0 = time.perf_counter()
        for p in self._tree():
            try:
                p.cpu_percent(None)  # prime psutil's per-process CPU counters
            except psutil.Error:
                pass
        self._thread.start()
        return self

    def stop(self) -> pd.DataFrame:
        self._stop.set()
        self._thread.join()
        self.rows.append(self._sample())  # a closing sample so the integral covers the whole run
        cols = ["t", "cpu_percent", "rss_bytes", "gpu_util", "gpu_power_w", "gpu_mem_bytes", "cpu_energy_j"]
        return pd.DataFrame(self.rows).reindex(columns=cols).astype(float)

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self.samples = self.stop()


def summarize(samples: pd.DataFrame, sources: list[str]) -> dict:
    """Averages and integrated energy of one run's samples."""
    out: dict = {
        "samples": len(samples),
        "cpu_percent_avg": float(samples.cpu_percent.mean()) if len(samples) else None,
        "cpu_mem_avg_gb": float(samples.rss_bytes.mean() / 1e9) if len(samples) else None,
        "cpu_mem_peak_gb": float(samples.rss_bytes.max() / 1e9) if len(samples) else None,
        # what the measured work added: its peak resident memory over the process's at its start
        # (the process's own size, Python and the libraries, is the same for every system)
        "cpu_mem_added_gb": float((samples.rss_bytes.max() - samples.rss_bytes.iloc[0]) / 1e9) if len(samples) else None,
        "gpu_util_avg": None,
        "gpu_power_avg_w": None,
        "gpu_energy_wh": None,
        "cpu_energy_wh": None,
    }
    if "nvml" in sources and samples.gpu_power_w.notna().any():
        t, w = samples.t.to_numpy(), samples.gpu_power_w.to_numpy()
        out["gpu_util_avg"] = float(samples.gpu_util.mean())
        out["gpu_power_avg_w"] = float(np.nanmean(w))
        out["gpu_energy_wh"] = float(np.trapezoid(w, t) / 3600.0) if len(t) > 1 else 0.0
    if "rapl" in sources and samples.cpu_energy_j.notna().any():
        out["cpu_energy_wh"] = float(samples.cpu_energy_j.iloc[-1] / 3600.0)
    counted = [k for k in ("gpu_energy_wh", "cpu_energy_wh") if out[k] is not None]
    out["energy_wh"] = float(sum(out[k] for k in counted)) if counted else None
    out["energy_sources"] = ",".join(k.split("_")[0] for k in counted) or "none"  # the report says why: no counter readable here
    return out


def combine_summaries(parts: list[dict]) -> dict:
    """One summary of work measured in parts (the shards of a stage, on one machine or several),
    counted as if the parts ran one after another: samples, times and energies add up, averages
    are weighted by samples, and the peak memory and the memory added are the largest part's
    (each part ran in its own process). An energy is None unless every part measured it."""

    def values(key: str) -> list:
        return [p.get(key) for p in parts]

    def total(key: str) -> float | None:
        found = values(key)
        return float(sum(found)) if found and all(v is not None for v in found) else None

    def weighted(key: str) -> float | None:
        pairs = [(p[key], p.get("samples") or 0) for p in parts if p.get(key) is not None]
        weight = sum(w for _, w in pairs)
        return float(sum(v * w for v, w in pairs) / weight) if weight else None

    def largest(key: str) -> float | None:
        found = [v for v in values(key) if v is not None]
        return float(max(found)) if found else None

    out: dict = {
        "samples": int(sum(p.get("samples") or 0 for p in parts)),
        "cpu_percent_avg": weighted("cpu_percent_avg"),
        "cpu_mem_avg_gb": weighted("cpu_mem_avg_gb"),
        "cpu_mem_peak_gb": largest("cpu_mem_peak_gb"),
        "cpu_mem_added_gb": largest("cpu_mem_added_gb"),
        "gpu_util_avg": weighted("gpu_util_avg"),
        "gpu_power_avg_w": weighted("gpu_power_avg_w"),
        "gpu_energy_wh": total("gpu_energy_wh"),
        "cpu_energy_wh": total("cpu_energy_wh"),
    }
    counted = [k for k in ("gpu_energy_wh", "cpu_energy_wh") if out[k] is not None]
    out["energy_wh"] = float(sum(out[k] for k in counted)) if counted else None
    out["energy_sources"] = ",".join(k.split("_")[0] for k in counted) or "none"
    if any("wall_s" in p for p in parts):
        out["wall_s"] = total("wall_s")
    return out


def serial_samples(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The telemetry samples of parts measured apart, one after another: each part's times and
    cumulative CPU energy continue from where the part before it ended."""
    cols = ["t", "cpu_percent", "rss_bytes", "gpu_util", "gpu_power_w", "gpu_mem_bytes", "cpu_energy_j"]
    shifted, t0, e0 = [], 0.0, 0.0
    for frame in frames:
        if not len(frame):
            continue
        frame = frame.reindex(columns=cols).astype(float)
        shifted.append(frame.assign(t=frame.t + t0, cpu_energy_j=frame.cpu_energy_j + e0))
        t0 += float(frame.t.iloc[-1])
        if frame.cpu_energy_j.notna().any():
            e0 += float(frame.cpu_energy_j.dropna().iloc[-1])
    return pd.concat(shifted, ignore_index=True) if shifted else pd.DataFrame(columns=cols, dtype=float)


def energy_per_correct_mwh(energy_wh: float | None, correct: int) -> float | None:
    if energy_wh is None or correct <= 0:
        return None
    return energy_wh * 1000.0 / correct


def measure(fn, cfg: TelemetryConfig | None = None):
    """Run `fn()` under a sampler: (its value, summary with wall_s, samples)."""
    sampler = Sampler(cfg or TelemetryConfig()).start()
    t0 = time.perf_counter()
    try:
        value = fn()
    finally:
        wall = time.perf_counter() - t0
        samples = sampler.stop()
    return value, summarize(samples, sampler.sources) | {"wall_s": wall}, samples


def measured_stage(out: Path, name: str, schema: str, n_images: int, compute, cfg: TelemetryConfig, label: str = ""):
    """A model stage's outputs and info: `compute()` writes out/<name>.parquet under telemetry.

    With no image to process nothing runs and nothing is measured: an empty table of
    `schema` is written. Returns ({output name: file}, info) for `Store.build_stage`.
    """
    from saec.artifacts.schemas import empty_table
    from saec.artifacts.store import write_table

    target = out / f"{name}.parquet"
    if n_images == 0:
        write_table(empty_table(schema), schema, target)
        return {name: target}, {"images": 0, "seconds": 0.0, "label": label}
    info, summary, samples = measure(compute, cfg)
    write_table(samples, "telemetry", out / "telemetry.parquet")
    files = {name: target, "telemetry": out / "telemetry.parquet"}
    return files, {"images": n_images, "seconds": summary["wall_s"], "telemetry": summary, "label": label,
                   "run": jsonable(info)}  # fmt: skip


def jsonable(obj):
    """Plain JSON types for a stage record: numpy scalars to Python, paths and the rest to text."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
