"""Training runs as the web UI shows them, read from their folders (so a reload shows them again).

    WORKDIR/runs/NAME/    the run's output_dir: what ``fourbit train`` writes (metrics.jsonl,
                          checkpoint-N/, the adapter, training_loss.png)
    WORKDIR/jobs/NAME/    its job (webui/jobs.py): train.yaml, the config it was started with, and
                          the process's log

metrics.jsonl has one line per optimizer step (step, epoch, loss, lr, grad_norm, tokens_per_s)
and, where the run holds out an eval set, one per evaluation (step, eval_loss). The progress
(step of total) is read from the training's own progress bar in the log.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..io.peft import WEIGHTS_FILE
from ..train.checkpoint import METRICS_FILE, checkpoints
from ..train.plot import loss_figure
from .jobs import Job, jobs

CONFIG_FILE = "train.yaml"
LOG_LINES = 20  # the log's last lines the tab shows, all in view
_PROGRESS = re.compile(r"^training:.*?\|\s*(\d+)/(\d+)\b", re.M)


@dataclass
class RunView:
    name: str
    state: str  # the job's: running, finished, failed (exit N), crashed (...), stopped, gone
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float | None = None
    step: int = 0
    total_steps: int | None = None
    checkpoints: list[str] = field(default_factory=list)
    adapter: str | None = None  # the final adapter's folder, once written
    log: str = ""
    error: str | None = None

    def figure(self, smooth: int = 10):
        """The live curve: each step's loss, its moving average, the eval loss, the learning rate."""
        return loss_figure(self.losses, smooth, self.eval_losses, self.learning_rates) if self.losses else None

    def summary(self) -> str:
        progress = f"step {self.step}" + (f" of {self.total_steps}" if self.total_steps else "")
        parts = [f"**{self.name}**: {self.state}", progress]
        if self.losses:
            parts.append(f"loss {self.losses[-1]:.4f}")
        if self.eval_losses:
            parts.append(f"eval loss {self.eval_losses[-1][1]:.4f}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        if self.checkpoints:
            parts.append(f"last checkpoint {self.checkpoints[-1]}")
        if self.adapter:
            parts.append(f"adapter: `{self.adapter}`")
        return " · ".join(parts) + (f"\n\n**error:** `{self.error}`" if self.error else "")


def run_folder(workdir: Path, name: str) -> Path:
    return workdir / "runs" / name


def job_folder(workdir: Path, name: str) -> Path:
    return workdir / "jobs" / name


def run_names(workdir: Path) -> list[str]:
    """The training runs started from the UI, newest first."""
    return [job.name for job in jobs(workdir / "jobs", kind="train")]


def view(workdir: Path, name: str) -> RunView:
    folder = job_folder(workdir, name)
    job = Job.load(folder)
    out = run_folder(workdir, name)
    status = job.status(200)  # enough lines for the progress bar's last state
    run = RunView(name, status.state, log="\n".join(status.log.splitlines()[-LOG_LINES:]), error=status.error)
    for record in _records(out / METRICS_FILE):
        if "eval_loss" in record:
            run.eval_losses.append((record["step"], record["eval_loss"]))
        elif "loss" in record:
            run.steps.append(record["step"])
            run.losses.append(record["loss"])
            run.learning_rates.append(record["lr"])
            run.tokens_per_s = record.get("tokens_per_s")
    run.step = run.steps[-1] if run.steps else 0
    bars = _PROGRESS.findall(status.log)
    run.total_steps = int(bars[-1][1]) if bars else None
    run.checkpoints = [c.name for c in checkpoints(out)] if out.is_dir() else []
    run.adapter = str(out) if (out / WEIGHTS_FILE).is_file() and run.state == "finished" else None
    return run


def _records(path: Path) -> list[dict]:
    """metrics.jsonl's complete lines (the last one may be mid-write while the run goes on)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
