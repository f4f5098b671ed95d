"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    checkpoint-N/
        adapter_config.json, adapter_model.safetensors   the adapter, in PEFT's format
        optimizer.pt                                       optimizer.state_dict()
        scheduler.pt                                       the LR scheduler's state_dict()
        rng.pt                                             torch, python and numpy RNG states
        trainer_state.json                                 step, epoch, next micro-batch, losses, eval losses
        run_config.json                                    the config of the run that wrote it

A checkpoint belongs to its run: resuming compares the checkpoint's config with this run's and
refuses one written by another run (another seed, learning rate, dataset...), naming the keys
that differ. Only what does not change the training may differ (RESUMABLE_KEYS: where and how
often it writes and reports, how the work is spread over processes).

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

from ..errors import InputError
from ..io.atomic import atomic_dir, atomic_file
from ..io.peft import (
    BASE_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_state_dict,
    load_adapter_weights,
    read_adapter,
    write_adapter_files,
)
from .config import TrainConfig
from .distributed import SINGLE, Ranks
from .optimizer_state import full_optimizer_state, load_optimizer_state

STATE_FILE = "trainer_state.json"
RUN_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
# What a run writes in its output_dir besides checkpoints (all of it replaced by a fresh run);
# runs/ is tensorboard's default logging_dir (report_to).
RUN_OUTPUTS = (METRICS_FILE, CONFIG_FILE, WEIGHTS_FILE, BASE_FILE, "training_loss.png", "runs")
# Config keys a resumed run may change: where and how often it saves and reports, evaluation,
# and the processes it runs on (a checkpoint resumes on any number of ranks, either strategy).
RESUMABLE_KEYS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "save_steps", "save_total_limit",
    "logging_steps", "plot_loss", "eval_dataset", "eval_max_new_tokens", "eval_steps", "per_device_eval_batch_size",
    "report_to", "run_name", "logging_dir", "strategy", "ddp_backend", "ddp_timeout", "dataset_dir",
    "eval_strategy", "do_eval", "save_only_model", "preprocessing_num_workers",
})


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch of the next micro-batch
    micro_batch: int = 0  # index of the next micro-batch within that epoch
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    eval_losses: list[list] = field(default_factory=list)  # [step, eval loss] at each evaluation (val_size)


def save_checkpoint(
    folder: Path, model, optimizer, scheduler, state: TrainState, base_model: str | None, run_config: dict,
    ranks: Ranks = SINGLE, model_only: bool = False,
) -> Path:
    """``model_only`` (save_only_model): the adapter, the position and the config, without the
    optimizer, scheduler and RNG states; such a checkpoint cannot be resumed."""
    adapter = adapter_state_dict(model)  # gathered whole: every rank calls these two
    optimizer_state = None if model_only else full_optimizer_state(model, optimizer, ranks)
    if ranks.is_main:
        with atomic_dir(folder, overwrite=True) as tmp:
            write_adapter_files(model, tmp, base_model, adapter)
            if not model_only:
                torch.save(optimizer_state, tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(
                    {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
                    tmp / "rng.pt",
                )
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
            (tmp / RUN_FILE).write_text(json.dumps(run_config, indent=2, default=str))
    ranks.barrier()
    return folder


def load_checkpoint_adapter(folder: Path, model) -> None:
    """The checkpoint's adapter weights into the (not yet wrapped) model."""
    missing = [n for n in (WEIGHTS_FILE, "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE) if not (folder / n).is_file()]
    if missing and _model_only(folder):
        raise InputError(f"{folder} was written with save_only_model: true: it holds the adapter but not the optimizer's, "
                         "scheduler's and random generators' states, so the run cannot continue exactly from it; "
                         "start afresh, or use its adapter (fourbit.load_adapter, fourbit merge)")
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete fourbit checkpoint: it lacks {missing}")
    load_adapter_weights(model, read_adapter(folder).tensors, str(folder))


def _model_only(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / RUN_FILE).read_text()).get("save_only_model"))
    except (OSError, ValueError):
        return False


def check_same_run(folder: Path, run_config: dict) -> None:
    """Refuse a checkpoint that another run wrote: one whose config differs from ``run_config``
    in a key outside RESUMABLE_KEYS."""
    path = folder / RUN_FILE
    if not path.is_file():
        raise InputError(
            f"{folder} does not record the config of the run that wrote it ({RUN_FILE}; checkpoints of fourbit "
            "an older fourbit), so it cannot be shown to belong to this run; start afresh, or write this run's "
            f"config there as {RUN_FILE} if you are sure it is the same run"
        )
    ours = json.loads(json.dumps(run_config, default=str))  # the same normalization as the saved file
    # A key added to fourbit since the checkpoint was written counts there as its default: the
    # default is what runs did before the key existed (val_size 0: nothing held out).
    defaults = json.loads(json.dumps(TrainConfig().to_dict(), default=str))
    theirs = defaults | json.loads(path.read_text())
    differ = sorted(k for k in (theirs.keys() | ours.keys()) - RESUMABLE_KEYS if theirs.get(k) != ours.get(k))
    if differ:
        changes = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in differ[:5])
        raise InputError(
            f"{folder} belongs to another run ({changes}{'; ...' if len(differ) > 5 else ''}): resume with that run's "
            "config, or start this one afresh (overwrite_output_dir: true without resume_from_checkpoint removes "
            "the old run's checkpoints)"
        )


def load_training_state(folder: Path, model, optimizer, scheduler, ranks: Ranks = SINGLE) -> TrainState:
    """Optimizer, scheduler and RNG states from ``folder``; returns the position in the data."""
    load_optimizer_state(model, optimizer, torch.load(folder / "optimizer.pt", weights_only=True), ranks)
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


def check_output_dir(output_dir: Path, resume_from_checkpoint: str | None, overwrite: bool, run_config: dict) -> Path | None:
    """The checkpoint this run resumes from (None: it starts afresh), once shown to be this run's;
    refuses an output_dir that holds files when neither resuming nor overwriting."""
    resume = resolve_resume(resume_from_checkpoint, output_dir)
    if resume is not None:
        check_same_run(resume, run_config)
    elif output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {output_dir} already holds files; set overwrite_output_dir: true, or resume_from_checkpoint: latest"
        )
    return resume


def tidy_output_dir(output_dir: Path, fresh: bool) -> None:
    """What an interrupted write left in ``output_dir``, cleared before a run starts: a checkpoint
    caught between its old and new version (atomic_dir's ``.checkpoint-N.old-*``) is put back,
    other temporary folders and files are removed. ``fresh`` (overwrite_output_dir, no resume):
    also the previous run's outputs, so that nothing of it is resumed or mixed into this run's
    records; files fourbit did not write are left alone."""
    if not output_dir.is_dir():
        return
    for aside in output_dir.glob(".checkpoint-*.old-*"):
        for stranded in aside.glob("checkpoint-*"):
            if not (output_dir / stranded.name).exists():
                stranded.replace(output_dir / stranded.name)
    leftovers = [*output_dir.glob(".checkpoint-*.tmp-*"), *output_dir.glob(".checkpoint-*.old-*"),
                 *output_dir.glob(".adapter-*"), *output_dir.glob(f".{METRICS_FILE}.tmp-*")]
    if fresh:
        leftovers += checkpoints(output_dir) + [output_dir / name for name in RUN_OUTPUTS]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def trim_metrics(output_dir: Path, step: int) -> None:
    """Keep metrics.jsonl's records up to ``step`` (a resumed run's checkpoint): the steps after
    it are trained again and recorded again, once."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        with atomic_file(path) as f:
            f.write("".join(line + "\n" for line in kept))


def rotate(output_dir: Path, keep: int | None) -> None:
    """Delete the oldest checkpoints beyond ``keep`` (save_total_limit)."""
    if keep is None:
        return
    for old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
