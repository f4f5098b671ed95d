"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    checkpoint-N/
        adapter_config.json, adapter_model.safetensors   the adapter, in PEFT's format
        optimizer.pt                                       optimizer.state_dict()
        scheduler.pt                                       the LR scheduler's state_dict()
        rng.pt                                             torch, python and numpy RNG states
        trainer_state.json                                 step, epoch, next micro-batch, losses

Each checkpoint is written into a temporary folder and renamed into place (io/atomic.py), so
a crash mid-save leaves the previous checkpoints intact and never a half-written one. With the
same data order (a pure function of seed and epoch), optimizer and RNG state, a resumed run
repeats the uninterrupted run's losses exactly.

On several ranks (train/distributed.py) every rank takes part in gathering the adapter and the
optimizer state (under FSDP they are sharded), rank 0 alone writes, and all meet at a barrier.
The files are the single-process ones, so a checkpoint resumes on any number of ranks. Resuming
is two calls: the adapter into the plain model (before it is wrapped or sharded), then the
optimizer, scheduler and RNGs into the run built around it.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..io.atomic import atomic_dir
from ..io.peft import (
    WEIGHTS_FILE,
    adapter_state_dict,
    load_adapter_weights,
    write_adapter_files,
)
from .distributed import SINGLE, Ranks

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch of the next micro-batch
    micro_batch: int = 0  # index of the next micro-batch within that epoch
    losses: list[float] = field(default_factory=list)  # one per optimizer step


def save_checkpoint(
    folder: Path, model, optimizer, scheduler, state: TrainState, base_model: str | None, ranks: Ranks = SINGLE
) -> Path:
    adapter = adapter_state_dict(model)  # gathered whole: every rank calls these two
    optimizer_state = ranks.full_optimizer_state(model, optimizer)
    if ranks.is_main:
        with atomic_dir(folder, overwrite=True) as tmp:
            write_adapter_files(model, tmp, base_model, adapter)
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(
                {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
                tmp / "rng.pt",
            )
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
    ranks.barrier()
    return folder


def load_checkpoint_adapter(folder: Path, model) -> None:
    """The checkpoint's adapter weights into the (not yet wrapped) model."""
    missing = [n for n in (WEIGHTS_FILE, "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete fourbit checkpoint: it lacks {missing}")
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        load_adapter_weights(model, {k: f.get_tensor(k) for k in f.keys()}, str(folder))  # noqa: SIM118 - not a dict


def load_training_state(folder: Path, model, optimizer, scheduler, ranks: Ranks = SINGLE) -> TrainState:
    """Optimizer, scheduler and RNG states from ``folder``; returns the position in the data."""
    ranks.load_optimizer_state(model, optimizer, torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=False)  # python/numpy states are tuples; our own file
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return TrainState(**json.loads((folder / STATE_FILE).read_text()))


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders in ``output_dir``, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """``resume_from_checkpoint``: a folder, or "latest"/"true" for the newest in output_dir."""
    if spec is None or str(spec).lower() in ("false", "none", ""):
        return None
    if str(spec).lower() in ("latest", "true"):
        found = checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint={spec!r}: {output_dir} holds no checkpoint-N folder")
        return found[-1]
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a folder")
    return path


def rotate(output_dir: Path, keep: int | None) -> None:
    """Delete the oldest checkpoints beyond ``keep`` (save_total_limit)."""
    if keep is None:
        return
    for old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
