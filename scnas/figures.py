"""The figures that searches, training and cross-validation draw: one legend placement, whole
epochs on the x axis, atomic PNG files, and how often they are redrawn."""

from __future__ import annotations

import io
from pathlib import Path

from scnas.fileio import atomic_write_bytes


PLOT_EVERY_SECONDS = 300.0
"""The figures of a search or training are drawn after its last epoch and after any epoch that
ends at least this long after they were last drawn (drawing takes seconds, which would dominate
short epochs); the data behind them are written every epoch."""


def legend_below(figure, *axes, columns: int = 3) -> None:
    """One legend for the lines of all ``axes`` (e.g. a twinx pair), under the plot where it
    hides neither a line nor an axis, and whole epochs on the x axis.

    Args:
        figure: the matplotlib figure.
        axes: the axes whose lines the legend lists.
        columns: columns of the legend.
    """
    from matplotlib.ticker import MaxNLocator

    handles, labels = [], []
    for axis in axes:
        h, l = axis.get_legend_handles_labels()
        handles += h
        labels += l
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=columns, frameon=False)


def save_figure(figure, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_history(path: Path, history: list[dict], losses: dict[str, str], *, dice: tuple[str, str],
                 columns: int = 3) -> None:
    """Losses over epochs (``losses``: record key -> label; left axis, soft Jaccard distance)
    and a Dice (``dice``: key, label; right axis, dashed), written as PNG to ``path``.

    Args:
        path: the PNG to write.
        history: the epochs' records.
        losses: record key -> label of each loss (left axis).
        dice: (record key, label) of the Dice (right axis).
        columns: columns of the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, left = plt.subplots(figsize=(7, 4))
    epochs = [r["epoch"] for r in history]
    for key, label in losses.items():
        left.plot(epochs, [r[key] for r in history], label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("soft Jaccard distance")
    right = left.twinx()
    right.plot(epochs, [r[dice[0]] for r in history], "k--", label=dice[1])
    right.set_ylabel("Dice")
    legend_below(figure, left, right, columns=columns)
    save_figure(figure, path)
