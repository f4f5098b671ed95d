"""``report_to``: training's records sent to experiment trackers, each through its own writer.

    tensorboard   torch.utils.tensorboard.SummaryWriter, event files in logging_dir
                  (default output_dir/runs); a resumed run purges the steps it trains again
    wandb         wandb.init(project=$WANDB_PROJECT or "fourbit", name=run_name, config=the run's
                  config, dir=output_dir); WANDB_MODE=offline keeps it on disk (wandb reads it)
    mlflow        mlflow.start_run(run_name=...), the config as parameters (strings); local by
                  default (mlflow's own default store in the working folder: ./mlruns, or
                  mlflow.db from mlflow 3.7), or wherever MLFLOW_TRACKING_URI points

Every record the recipe writes to metrics.jsonl goes to every tracker, under HF's names:
train/loss, train/learning_rate, train/grad_norm, train/tokens_per_s, train/epoch, and
eval/loss; the step is the optimizer step. Only rank 0 reports. A resumed run is a new wandb or
mlflow run whose steps start after its checkpoint's; tensorboard's reader joins it to the first.

Each library is imported when its tracker opens; a missing one is refused naming the extra that
installs it, which :func:`check_trackers` does before the model loads. Adding a tracker is one
class with ``log(metrics, step)`` and ``close()`` and one entry in REPORTERS.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)

# metrics.jsonl's keys -> the trackers' names (HF Trainer's spelling); "step" is the x axis
NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
         "tokens_per_s": "train/tokens_per_s", "epoch": "train/epoch", "eval_loss": "eval/loss"}


class TensorBoard:
    module, extra = "torch.utils.tensorboard", "tensorboard"

    def __init__(self, config: TrainConfig, run_config: dict, resume_step: int | None):
        log_dir = config.logging_dir or Path(config.output_dir) / "runs"
        # purge_step: the steps after the checkpoint, which the interrupted try wrote and this run
        # trains again, are hidden by tensorboard's reader (it writes a SessionLog START there)
        self.writer = _library(self).SummaryWriter(
            log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    module, extra = "wandb", "wandb"

    def __init__(self, config: TrainConfig, run_config: dict, resume_step: int | None):
        self.run = _library(self).init(project=os.environ.get("WANDB_PROJECT", "fourbit"), name=run_name(config),
                                       config=run_config, dir=config.output_dir)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    module, extra = "mlflow", "mlflow"

    def __init__(self, config: TrainConfig, run_config: dict, resume_step: int | None):
        self.mlflow = _library(self)
        self.mlflow.start_run(run_name=run_name(config))
        # the config is flat (a list is one value); its ~50 keys are under mlflow's 100 parameters a call
        self.mlflow.log_params({key: str(value) for key, value in run_config.items()})

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


REPORTERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def run_name(config: TrainConfig) -> str:
    return config.run_name or Path(config.output_dir).resolve().name


def _library(tracker):
    """The module ``tracker`` writes through, or an InputError naming the extra that installs it."""
    try:
        return importlib.import_module(tracker.module)
    except ImportError as e:
        raise InputError(f"report_to: {tracker.module} cannot be imported ({e}); install it with "
                         f"pip install 'fourbit[{tracker.extra}]'") from None


def check_trackers(config: TrainConfig) -> None:
    """Each tracker's library importable, or an InputError naming the extra to install."""
    for name in config.trackers:
        _library(REPORTERS[name])


class Reporters:
    """The run's trackers: each record of metrics.jsonl goes to all of them."""

    def __init__(self, config: TrainConfig, run_config: dict, resume_step: int | None, enabled: bool = True):
        """``resume_step``: the checkpoint's step (None: a fresh run); ``enabled``: False on ranks other than 0."""
        self.trackers: list = []
        try:
            for name in config.trackers if enabled else []:
                self.trackers.append(REPORTERS[name](config, run_config, resume_step))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl: its step and the values the trackers take."""
        metrics = {NAMES[key]: value for key, value in record.items() if key in NAMES}
        for tracker in self.trackers:
            tracker.log(metrics, record["step"])

    def close(self) -> None:
        """Close every tracker; one that fails to close is logged and does not keep the others open."""
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:
                log.warning("closing %s failed: %s", type(tracker).__name__, e)
        self.trackers = []
