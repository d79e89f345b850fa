"""Plots of a search run: losses and Dice over epochs, and softmax(alpha) per cell over epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel


class AlphaRecord(BaseModel):
    """One epoch of plots/alpha.json: softmax(alpha) per cell type, edge and op."""

    epoch: int
    p: dict[str, list[list[float]]]


def write_plots(run: Path, history: list[dict[str, Any]], arch, *, config, draw: bool = True) -> None:
    """plots/losses.png and plots/alpha_<cell>.png (the alpha history is kept in plots/alpha.json,
    updated every call; the figures only when ``draw``: drawing them takes seconds).

    Args:
        run: the run folder.
        history: the epochs' records.
        arch: the architecture (alpha).
        config: the search's settings.
        draw: draw the figures (else only plots/alpha.json).
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scnas.fileio import atomic_write_text
    from scnas.records import read_json
    from scnas.figures import legend_below, plot_history, save_figure
    from scnas.search.supernet import cell_edges

    folder = run / "plots"
    folder.mkdir(exist_ok=True)
    track_path = folder / "alpha.json"
    track = read_json(track_path, "remove it (the alpha plots then start at this epoch) and resume the search",
                      list[AlphaRecord]) if track_path.exists() else []
    track = [t for t in track if t["epoch"] < history[-1]["epoch"]]
    track.append({"epoch": history[-1]["epoch"], "p": {n: p.cpu().tolist() for n, p in arch.probabilities().items()}})
    atomic_write_text(track_path, json.dumps(track) + "\n")
    if not draw:
        return

    def save(figure, name: str) -> None:
        save_figure(figure, folder / name)

    plot_history(folder / "losses.png", history, {"theta_loss": "Theta loss (weight set)",
                                                  "alpha_loss": "alpha loss (architecture set)"},
                 dice=("architecture_dice", "Dice of derived cells"))
    pairs = cell_edges(config.nodes)
    for name in track[-1]["p"]:
        columns = min(len(pairs), 5)
        rows = -(-len(pairs) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.2 * rows), sharex=True, sharey=True,
                                    squeeze=False)
        steps = [t["epoch"] for t in track]
        for index, (source, target) in enumerate(pairs):
            axis = axes[index // columns][index % columns]
            for op_index, op in enumerate(config.ops):
                axis.plot(steps, [t["p"][name][index][op_index] for t in track], label=op)
            axis.set_title(f"{source} -> {target}", fontsize=9)
        for index in range(len(pairs), rows * columns):
            axes[index // columns][index % columns].axis("off")
        for axis in axes[-1]:
            axis.set_xlabel("epoch", fontsize=8)
        legend_below(figure, axes[0][0], columns=min(len(config.ops), 4))
        figure.suptitle(f"{name}: softmax(alpha) per edge over epochs")
        save(figure, f"alpha_{name}.png")
