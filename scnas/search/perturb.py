"""Cells chosen by what each operation does to the loss, not by alpha's size (DARTS-PT).

Wang et al. ("Rethinking architecture selection in differentiable NAS", ICLR 2021) showed
that the largest alpha of an edge need not be its most useful operation: in DARTS's
continuous relaxation the weights of an operation can grow while its alpha stays small, and
parameter-free operations win alpha for reasons of their own (the collapse). They choose each
edge's operation by **perturbation** instead: remove one operation from the edge's mixture
and measure how much the supernet's loss rises on held-out data; the operation whose removal
hurts most is the one the network relies on.

Here, once per finished search (the single pass of DARTS-PT's measure, without its
discretise-and-fine-tune rounds):

1. the supernet of the run's checkpoint runs every operation of every edge weighted by
   softmax(alpha) (the relaxation of ``--sampling full``, DARTS);
2. its loss (the search's loss, over all patches at once) is measured on fixed patches of the
   architecture set (never the fold's validation cases);
3. for every (cell type, edge, non-zero operation), the same loss with that operation's weight
   set to 0 on that edge alone; the **rise** is the score of the operation. ``zero`` scores 0
   (removing nothing changes nothing);
4. cells are derived from the scores with the usual rules (:func:`scnas.search.derive.derive_genotype`,
   ``strength``): ``top-k``, per node the ``top_k`` incoming edges whose best operation's rise is
   largest, each with that operation; ``argmax``, per edge the operation of the largest rise, no
   edge where no removal raises the loss.

Cost: ``1 + cells x edges x non-zero ops`` forward passes over the patches (141 for the paper's
4 nodes would be 393 at 14 edges per cell); no backward pass.

The supernet is measured as it was searched only with ``--sampling full``; a search that ran
two sampled operations per edge (``pair``, the paper's) trained its weights in pairs, and the
full mixture is a network its weights have never seen (docs/search.md says what that gives).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from scnas import defaults as D
from scnas.errors import ScnasError
from scnas.genotype import CELL_TYPES
from scnas.genotype.ops import ZERO
from scnas.search.supernet import EdgeChoice, SuperNet, cell_edges

SCORES_FILE = "perturbation.json"
"""Where ``scnas derive --by perturbation`` keeps a run's scores (next to its checkpoint)."""

SCORES_FORMAT = "scnas-perturbation-scores"


class PerturbationError(ScnasError):
    """A run whose operations cannot be scored by perturbation."""


def mixture_choices(probabilities: dict[str, torch.Tensor], removed: tuple[str, int, int] | None = None
                    ) -> dict[str, list[EdgeChoice]]:
    """The supernet's argument for the full mixture (every op weighted by ``probabilities``);
    ``removed`` = (cell type, edge, op): that operation left out of that edge (weight 0)."""
    choices = {}
    for name, p in probabilities.items():
        row_ops = tuple(range(p.shape[1]))
        edges = []
        for edge in range(p.shape[0]):
            if removed is not None and removed[0] == name and removed[1] == edge:
                weights = p[edge].clone()
                weights[removed[2]] = 0.0
                edges.append(EdgeChoice(weights, tuple(o for o in row_ops if o != removed[2])))
            else:
                edges.append(EdgeChoice(p[edge], row_ops))
        choices[name] = edges
    return choices


def perturbation_scores(loss_of: Callable[[dict[str, list[EdgeChoice]]], float], probabilities: dict[str, torch.Tensor],
                        ops: list[str], *, cells: tuple[str, ...] = CELL_TYPES) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of the full mixture, and per cell type an (edges, ops) tensor of the rise in loss
    when each operation is removed from each edge (``zero``'s column: 0).

    Args:
        loss_of: the loss of the supernet for a choices argument (:func:`mixture_choices`).
        probabilities: softmax(alpha) per cell type, (edges, ops).
        ops: the vocabulary, in the columns' order.
        cells: the cell types to score (the others' rows stay 0).
    """
    base = loss_of(mixture_choices(probabilities))
    scores = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in probabilities.items()}
    for name in cells:
        for edge in range(probabilities[name].shape[0]):
            for index, op in enumerate(ops):
                if op != ZERO:
                    scores[name][edge, index] = loss_of(mixture_choices(probabilities, (name, edge, index))) - base
    return base, scores


def alpha_fingerprint(arch: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a checkpoint's alpha tensors (names and values): which search state scores belong to."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(arch):
        digest.update(name.encode())
        digest.update(arch[name].detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def scores_problem(result: Any, ops: list[str], nodes: int) -> str | None:
    """What is wrong with a scores document for a search of ``ops`` and ``nodes`` (None: nothing)."""
    if not isinstance(result, dict) or result.get("format") != SCORES_FORMAT:
        return f"is not a {SCORES_FORMAT} document"
    if list(result.get("ops") or []) != list(ops):
        return f"scores the ops {result.get('ops')}, the run searched {list(ops)}"
    if not isinstance(result.get("base_loss"), (int, float)):
        return "has no base_loss"
    scores = result.get("scores")
    edges = len(cell_edges(nodes))
    for cell in CELL_TYPES:
        rows = scores.get(cell) if isinstance(scores, dict) else None
        if not isinstance(rows, list) or len(rows) != edges or any(
                not isinstance(row, list) or len(row) != len(ops) or
                not all(isinstance(v, (int, float)) for v in row) for row in rows):
            return f"scores.{cell} is not {edges} rows of {len(ops)} numbers (one per candidate edge and op)"
    return None


def run_scores(run: str | Path, *, patches: int = D.PERTURBATION_PATCHES, batch: int = 2, device: str = "cpu", seed: int = 0,
               epoch: int | None = None, say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Score the operations of a finished search run (its ``checkpoint.pt`` and ``config.json``)
    on ``patches`` architecture-set patches; kept in ``RUN/perturbation.json`` and reused while
    the checkpoint (its alpha's fingerprint and epoch) and the settings are the same.

    Args:
        run: the search run folder.
        patches: architecture-set patches the loss is measured on (fixed by ``seed``).
        batch: patches per forward pass (memory, not the result).
        device: ``cpu``, ``cuda`` or ``auto``.
        seed: draws the patches.
        epoch: the epoch of the genotype the scores will derive from: a checkpoint of another
            epoch, or one saved inside an epoch, is refused before scoring (None: not checked).
        say: prints what it does.
    """
    from scnas.build import BuildConfig
    from scnas.data.cache import Cache
    from scnas.data.loader import PatchDataset
    from scnas.engine.processes import resolve_device
    from scnas.engine.runs import read_run_config
    from scnas.fileio import atomic_write_text
    from scnas.metrics import LOSSES, jaccard_from_statistics, jaccard_statistics
    from scnas.search.loop import load_checkpoint

    run = Path(run)
    checkpoint = run / "checkpoint.pt"
    if not checkpoint.exists():
        raise PerturbationError("has no checkpoint.pt: scoring by perturbation needs the search's trained supernet "
                                "(a genotype file alone has only alpha)", source=str(run))
    config = read_run_config(run / "config.json", "search", "build")
    search, cases = config["search"], config.get("cases") or {}
    settings = {"patches": patches, "seed": seed}
    state = load_checkpoint(checkpoint)
    if state.get("step", 0):
        raise PerturbationError(f"checkpoint.pt was saved inside an epoch (step {state['step']} after epoch "
                                f"{state.get('epoch')}): scores of it would describe another network than the run's "
                                "genotypes; resume the search to the end of the epoch first (scnas search -o RUN "
                                "--resume)", source=str(run))
    if epoch is not None and state.get("epoch") != epoch:
        raise PerturbationError(f"the genotype is from epoch {epoch}, checkpoint.pt from epoch {state.get('epoch')}: "
                                "scores of it would describe another network", source=str(run))
    fingerprint = alpha_fingerprint(state["arch"])
    kept = run / SCORES_FILE
    if kept.exists():
        try:
            old = json.loads(kept.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if scores_problem(old, list(config["search"]["ops"]), config["search"]["nodes"]) is None \
                and old.get("epoch") == state.get("epoch") and old.get("alpha_sha256") == fingerprint \
                and old.get("settings") == settings:
            return old
    if not cases.get("architecture"):
        raise PerturbationError("config.json names no architecture-set cases to measure the loss on",
                                source=str(run / "config.json"))
    ops = list(search["ops"])
    target = resolve_device(device, PerturbationError)
    net = SuperNet(BuildConfig(**config["build"]), search["nodes"], ops).to(target)
    net.load_state_dict(state["net"])
    net.eval()
    probabilities = {name.split(".")[-1]: torch.softmax(alpha.to(target).float(), dim=-1)
                     for name, alpha in state["arch"].items()}
    try:
        cache = Cache(search["data"])
    except (OSError, ScnasError) as exc:
        raise PerturbationError(f"the search's data {search['data']!r} cannot be opened ({exc}): scoring needs "
                                "its architecture-set cases", source=str(run / "config.json")) from None
    data = PatchDataset(cache, list(cases["architecture"]), tuple(search["patch"]), samples_per_epoch=patches,
                        seed=seed, foreground_share=search.get("foreground_share", 1 / 3), augmentation=None)
    items = [data[i] for i in range(len(data))]
    x = torch.stack([item[0] for item in items]).to(target)
    y = torch.stack([item[1] for item in items]).to(target)
    foreground_only = LOSSES[search.get("loss", "jaccard")]

    def loss_of(choices: dict[str, list[EdgeChoice]]) -> float:
        with torch.no_grad():
            statistics = sum(jaccard_statistics(net(x[i:i + batch], choices), y[i:i + batch])
                             for i in range(0, len(x), batch))
        return float(jaccard_from_statistics(statistics, foreground_only=foreground_only))

    edges = sum(p.shape[0] for p in probabilities.values())
    say(f"{run}: scoring {edges} edges x {len([o for o in ops if o != ZERO])} operations by perturbation "
        f"on {patches} architecture-set patches")
    if search.get("sampling") != "full":
        say(f"note: {run} was searched with --sampling {search.get('sampling')}: its weights never ran as the full "
            "mixture these scores measure (docs/search.md)")
    started = time.perf_counter()
    base, scores = perturbation_scores(loss_of, probabilities, ops)
    seconds = round(time.perf_counter() - started, 1)
    last = _last_alpha_loss(run)
    if last is not None and base > 1.5 * last + 0.02:
        say(f"warning: {run}: the supernet of the checkpoint has a loss of {base:.3f} on these patches, but "
            f"{last:.3f} on the architecture set over its last epoch: the scores describe a network worse than the "
            "one the search trained (with the paper's Theta optimiser, beta2 = 0.001, single steps can throw it "
            "off); another epoch (scnas search --resume --epochs N) may land it better")
    result = {"format": SCORES_FORMAT, "version": 1, "epoch": state.get("epoch"), "alpha_sha256": fingerprint,
              "settings": settings,
              "sampling": search.get("sampling"), "ops": ops, "base_loss": round(base, 6),
              "last_epoch_alpha_loss": last, "seconds": seconds,
              "scores": {name: [[round(float(v), 6) for v in row] for row in s] for name, s in scores.items()}}
    atomic_write_text(kept, json.dumps(result) + "\n")
    return result


def _last_alpha_loss(run: Path) -> float | None:
    """The mean alpha loss (architecture set) of the run's last epoch in metrics.jsonl, or None."""
    try:
        lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        value = json.loads(lines[-1]).get("alpha_loss") if lines else None
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return round(float(value), 6) if isinstance(value, (int, float)) else None
