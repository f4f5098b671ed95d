"""The figures fourbit draws: training's loss curve and compare's perplexity against bits.

    training_loss.png   loss against optimizer step: every step's loss (light), its moving
                        average over the last ``smooth`` steps (dark), the eval loss where the
                        run has one (points on a line); titled axes, a grid, a legend (the web
                        UI's live curve adds the learning rate on a second axis)
    compare --plot      perplexity against bits per parameter, one labelled point per method

Drawn with matplotlib's object-oriented API on its Agg canvas: no display, no pyplot state
shared between threads or calls. Each figure is built by a function that returns it (what the
tests read) and written as a PNG through a temporary file, then renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io.atomic import atomic_file

SIZE = (8, 5)  # inches, at 100 dpi: 800 x 500 pixels


def moving_average(values: list[float], smooth: int) -> list[float]:
    """Each value's mean with the up to ``smooth - 1`` values before it."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= smooth:
            total -= values[i - smooth]
        out.append(total / min(i + 1, smooth))
    return out


def loss_figure(losses: list[float], smooth: int = 10, eval_losses: list[tuple[int, float]] | None = None,
                learning_rates: list[float] | None = None) -> Figure:
    """``losses``: one per optimizer step, from step 1; ``eval_losses``: (step, loss) pairs;
    ``learning_rates``: one per step, drawn on a second y axis at the right."""
    figure = Figure(figsize=SIZE, dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="#9db4d8", linewidth=1, label="training loss, each step")
    ax.plot(steps, moving_average(losses, smooth), color="#1f4e9c", linewidth=2,
            label=f"training loss, mean of the last {smooth} steps")
    if eval_losses:
        ax.plot([s for s, _ in eval_losses], [v for _, v in eval_losses], "o-", color="#d62728", linewidth=1.5,
                label="eval loss")
    ax.set(title="Training loss", xlabel="optimizer step", ylabel="loss (cross-entropy, nats per token)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if learning_rates:
        lr_ax = ax.twinx()
        lr_ax.plot(range(1, len(learning_rates) + 1), learning_rates, "--", color="#2ca02c", linewidth=1,
                   label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels)
    return figure


def plot_loss(losses: list[float], path: str | os.PathLike, smooth: int = 10,
              eval_losses: list[tuple[int, float]] | None = None) -> Path:
    return _save(loss_figure(losses, smooth, eval_losses), path)


def points_figure(points: list[tuple[float, float]], labels: list[str]) -> Figure:
    """(bits per parameter, perplexity) per method, each point labelled with its method."""
    figure = Figure(figsize=SIZE, dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for (x, y), label in zip(points, labels, strict=True):
        ax.scatter([x], [y], s=40, label=label, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set(title="Perplexity against size", xlabel="bits per parameter (weights and their constants)",
           ylabel="perplexity (lower is better)")
    ax.grid(True, alpha=0.3)
    return figure


def plot_points(points: list[tuple[float, float]], labels: list[str], path: str | os.PathLike) -> Path:
    return _save(points_figure(points, labels), path)


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    with atomic_file(path, "wb") as f:
        figure.savefig(f, format="png")
    return Path(path)
