"""Checkpoints of a cloud training: trainable weights, optimizer, scheduler, random states, the
position in the data order, the weight average and the step log, written so that a process
killed at any point resumes from the last complete checkpoint. Nothing read back is unpickled
except the optimizer's state, read with `weights_only=True`."""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saec.errors import ActionableError
from saec.artifacts.hashing import hash_obj, sha256_file
from saec.tasks.cloud.config import CloudTrainConfig


CHECKPOINTS = "checkpoints"


LOG_NAME = "train_log.parquet"


# Settings that do not change what is learned; a resume may change them.
RESUME_FREE = {"progress", "checkpoint_every", "keep_checkpoints", "preprocess_workers", "eval_batch_size"}


class ResumeError(ActionableError, RuntimeError):
    """A checkpoint in work_dir belongs to a different configuration or data set."""


def run_fingerprint(cfg: CloudTrainConfig, train_jsonl: Path, model_id: str) -> dict:
    learn = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUME_FREE}
    return {"config": hash_obj(learn), "train_data": sha256_file(train_jsonl), "base_model": model_id}


def seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _save_rng_state(folder: Path) -> None:
    """The random states, without pickle: torch's and numpy's key arrays in rng.safetensors, the rest in rng.json."""
    import torch
    from safetensors.torch import save_file

    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    n_cuda = 0
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state_all()
        tensors |= {f"cuda.{i}": t for i, t in enumerate(cuda)}
        n_cuda = len(cuda)
    save_file(tensors, str(folder / "rng.safetensors"))
    record = {"python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
              "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached_gaussian)},
              "cuda_devices": n_cuda}
    (folder / "rng.json").write_text(json.dumps(record))


def _load_rng_state(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    record = json.loads((folder / "rng.json").read_text())
    tensors = load_file(str(folder / "rng.safetensors"))
    py, npy = record["python"], record["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    if record["cuda_devices"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(record["cuda_devices"])])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The data order of one epoch: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch the next micro-batch belongs to
    next_micro: int = 0  # index of the next micro-batch within that epoch
    elapsed_s: float = 0.0
    session: int = 0

    def stepped(self, last_micro: int, n_micro: int) -> None:
        """One optimizer step done, its window ending at micro-batch `last_micro` of `n_micro`."""
        self.step += 1
        self.next_micro = last_micro + 1
        if self.next_micro >= n_micro:
            self.epoch, self.next_micro = self.epoch + 1, 0

    @property
    def last_epoch(self) -> int:
        """The epoch of the last step done."""
        return self.epoch if self.next_micro else self.epoch - 1


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


class WeightAverage:
    """Exponential moving average of the trained parameters, updated after every optimizer step.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so the first steps' random
    weights do not linger in the average."""

    def __init__(self, named: list[tuple[str, Any]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone().float() for p in self.params]

    def update(self, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    def state_dict(self) -> dict:
        return {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, weights: dict) -> None:
        if set(weights) != set(self.names):
            raise ResumeError("the checkpoint's weight average holds other parameters than the model trains")
        for n, s in zip(self.names, self.shadow):
            s.copy_(weights[n])

    def copy_to_model(self) -> None:
        import torch

        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))


def save_checkpoint(work_dir: Path, state: TrainState, model, optimizer, scheduler, log_rows: list[dict],
                    fingerprint: dict, keep: int, seed: int, n_examples: int,
                    average: WeightAverage | None = None) -> Path:
    """Write one checkpoint folder atomically (rename of a complete folder), then prune old ones."""
    import torch
    from safetensors.torch import save_file

    from saec.artifacts.store import write_table

    root = work_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    if average is not None:
        save_file(average.state_dict(), str(tmp / "average.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    _save_rng_state(tmp)
    write_log_frame(log_rows, tmp / LOG_NAME)
    record = {"state": state.__dict__, "fingerprint": fingerprint, "seed": seed,
              "order": epoch_order(seed, state.epoch, n_examples).tolist()}  # the data order of the next epoch step
    (tmp / "state.json").write_text(json.dumps(record))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_table(log_frame(log_rows), "cloud_train_log", work_dir / LOG_NAME)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, fingerprint: dict,
                    average: WeightAverage | None = None) -> tuple[TrainState, list[dict]]:
    import torch
    from safetensors.torch import load_file

    from saec.artifacts.store import read_table

    if not (ckpt / "rng.json").is_file():
        kept = "in rng.pt, an older format that is no longer read" if (ckpt / "rng.pt").exists() else "nowhere"
        raise ResumeError(f"checkpoint {ckpt} keeps its random states {kept}; delete {ckpt.parent} to start over")
    record = json.loads((ckpt / "state.json").read_text())
    theirs = record["fingerprint"]
    diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
    if diff:
        raise ResumeError(
            f"checkpoint {ckpt} was written by a run with different {diff}; "
            "use a fresh work_dir (or delete its checkpoints) to start over"
        )
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        raise ResumeError(f"checkpoint {ckpt} holds other trainable parameters than the model has")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    if average is not None:
        if not (ckpt / "average.safetensors").is_file():
            raise ResumeError(f"checkpoint {ckpt} holds no weight average (ema_decay)")
        average.load_state_dict(load_file(str(ckpt / "average.safetensors")))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    _load_rng_state(ckpt)
    state = TrainState(**record["state"])
    if record["order"] != epoch_order(record["seed"], state.epoch, len(record["order"])).tolist():
        raise ResumeError(f"checkpoint {ckpt}: the data order cannot be reproduced (numpy's generator changed?)")
    rows = read_table(ckpt / LOG_NAME).to_dict("records") if (ckpt / LOG_NAME).exists() else []
    rows = [r for r in rows if r["step"] <= state.step]
    return state, rows


def log_frame(rows: list[dict]):
    import pandas as pd

    from saec.artifacts.schemas import SCHEMAS

    cols = SCHEMAS["cloud_train_log"].names
    return pd.DataFrame(rows, columns=cols)


def write_log_frame(rows: list[dict], path: Path) -> None:
    from saec.artifacts.store import write_table

    write_table(log_frame(rows), "cloud_train_log", path)
