"""The loss and perplexity figures: what they draw, against numbers computed here, and the PNG
read back by matplotlib's own reader."""

import numpy as np
from matplotlib.image import imread

from fourbit.train.plot import loss_figure, plot_loss, plot_points, points_figure


def test_the_loss_figure_draws_every_step_its_moving_average_and_the_eval_loss(tmp_path):
    rng = np.random.default_rng(0)
    losses = list(3.0 * np.exp(-np.arange(37) / 15) + rng.normal(0, 0.1, 37))
    evals = [(10, 2.5), (20, 1.9), (30, 1.6)]
    ax = loss_figure(losses, smooth=5, eval_losses=evals).axes[0]
    raw, smoothed, evaluated = ax.lines
    assert list(raw.get_xdata()) == list(range(1, 38)) and np.allclose(raw.get_ydata(), losses)
    # the mean of each step's window of up to 5, from a cumulative sum in float64
    padded = np.concatenate([[0.0], np.cumsum(np.asarray(losses, dtype=np.float64))])
    want = [(padded[i + 1] - padded[max(0, i - 4)]) / min(i + 1, 5) for i in range(37)]
    assert np.allclose(smoothed.get_ydata(), want, rtol=1e-12)
    assert list(evaluated.get_xdata()) == [10, 20, 30] and list(evaluated.get_ydata()) == [2.5, 1.9, 1.6]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel().startswith("loss")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "training loss, each step", "training loss, mean of the last 5 steps", "eval loss"]

    path = plot_loss(losses, tmp_path / "loss.png", smooth=5, eval_losses=evals)
    image = imread(path)
    assert image.shape[:2] == (500, 800) and image[..., :3].std() > 0.05  # drawn, not blank
    assert not list(tmp_path.glob(".loss.png.tmp-*"))  # written through a temporary file


def test_the_learning_rate_is_drawn_on_a_second_axis_with_its_own_legend_entry():
    rates = [2e-4 * (1 - i / 20) for i in range(20)]
    figure = loss_figure([1.0] * 20, smooth=3, learning_rates=rates)
    loss_ax, lr_ax = figure.axes
    (line,) = lr_ax.lines
    assert list(line.get_xdata()) == list(range(1, 21)) and list(line.get_ydata()) == rates
    assert lr_ax.get_ylabel() == "learning rate"
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()][-1] == "learning rate"


def test_the_compare_figure_labels_a_point_per_method(tmp_path):
    points, labels = [(16.0, 10.2), (4.13, 10.9), (8.1, 10.3)], ["bf16", "nf4-dq", "int8"]
    ax = points_figure(points, labels).axes[0]
    assert [tuple(c.get_offsets()[0]) for c in ax.collections] == points
    assert [t.get_text() for t in ax.texts] == labels
    assert imread(plot_points(points, labels, tmp_path / "ppl.png")).shape[:2] == (500, 800)
