"""The bi-level search loop (paper, Section 2.2): alternate a Theta step on the weight set
and an alpha step on the architecture set (first-order), anneal tau, derive a genotype every
epoch, checkpoint atomically, resume exactly, and run under torchrun with DDP.

Exact resume: every random draw comes from state that the checkpoint holds (the Gumbel /
pair generator, torch's RNG) or from (seed, epoch, index) (the patches), so a run stopped at
any checkpoint and resumed ends with the same alpha as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from scnas import __version__
from scnas.build import BuildConfig
from scnas.build.losses import dice_per_class, soft_jaccard_loss
from scnas.data import architecture_split, fold_cases, open_or_prepare
from scnas.data.augment import default_augmentation
from scnas.data.loader import PatchDataset
from scnas.errors import ScnasError
from scnas.fileio import atomic_write_text
from scnas.genotype import write_genotype
from scnas.search.config import SearchConfig
from scnas.search.derive import derive_genotype
from scnas.search.sampling import SAMPLERS
from scnas.search.supernet import Architecture, SuperNet
from scnas.runtime import (Processes, StepBar, check_resume_settings, rank_loader, read_checkpoint, save_checkpoint,
                           setup_processes)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "scnas-search-checkpoint"


class SearchError(ScnasError):
    """A search that cannot start or had to stop."""


@dataclass
class SearchResult:
    run: Path
    epochs_done: int
    genotype_path: Path
    history: list[dict[str, Any]]
    skipped_steps: int


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a search checkpoint (tensors and plain data only: ``weights_only=True``)."""
    return read_checkpoint(path, CHECKPOINT_FORMAT, SearchError)


def _finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss).item())


def run_search(config: SearchConfig, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
               stop_after_steps: int | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """Run (or with ``resume`` continue) a search into ``run_dir``. ``stop_after_steps`` ends
    the run cleanly after that many steps in this call (for time-boxing and tests)."""
    run = Path(run_dir)
    d = setup_processes(config.device, SearchError)
    checkpoint_path = run / CHECKPOINT
    state: dict[str, Any] | None = None
    if resume:
        if not checkpoint_path.exists():
            raise SearchError("has no checkpoint to resume from", source=str(run))
        state = load_checkpoint(checkpoint_path)
        saved = SearchConfig.model_validate_json(state["config"])
        check_resume_settings(saved, config, run, SearchError)
    elif checkpoint_path.exists():
        raise SearchError("already holds a search; use --resume to continue it or another folder", source=str(run))
    if d.main:
        (run / "genotypes").mkdir(parents=True, exist_ok=True)
    d.barrier()
    cache = open_or_prepare(config.data, run / "cache", config.spacing, d.main, d.barrier)
    train_ids, _ = fold_cases(cache.splits, config.fold)
    weight_ids, arch_ids = architecture_split(train_ids, seed=config.seed, architecture_share=config.architecture_share)
    num_classes = len(cache.labels)
    build = BuildConfig(stem_channels=config.stem, in_channels=len(cache.channel_names), num_classes=num_classes,
                        depth=config.depth)
    if any(p % build.divisor for p in config.patch):
        raise SearchError(f"patch {config.patch} must be a multiple of 2**depth = {build.divisor} per axis")
    if d.main:
        atomic_write_text(run / "config.json", json.dumps({
            "scnas_version": __version__, "search": config.model_dump(mode="json"), "build": build.model_dump(),
            "tau_per_epoch": [config.tau(e) for e in range(config.epochs)], "world_size": d.world,
            "cases": {"weight": weight_ids, "architecture": arch_ids, "fold": config.fold}}, indent=2) + "\n")

    torch.manual_seed(config.seed)
    net = SuperNet(build, config.nodes, config.ops).to(d.device)
    arch = Architecture(config.nodes, config.ops, torch.Generator().manual_seed(config.seed)).to(d.device)
    model: torch.nn.Module = net
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True,
                                                          device_ids=[d.device] if d.device.type == "cuda" else None)
    theta_opt = torch.optim.Adam(net.parameters(), lr=config.theta_lr, betas=config.theta_betas)
    alpha_opt = torch.optim.Adam(arch.parameters(), lr=config.alpha_lr, betas=config.alpha_betas,
                                 weight_decay=config.alpha_weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(theta_opt, factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    sampler_rng = torch.Generator().manual_seed(config.seed + 1)  # same draws on every rank
    epoch, step_start, sums, history, skipped, streak = 0, 0, {"theta": 0.0, "alpha": 0.0, "n": 0}, [], 0, 0
    if state is not None:
        net.load_state_dict(state["net"])
        arch.load_state_dict(state["arch"])
        theta_opt.load_state_dict(state["theta_opt"])
        alpha_opt.load_state_dict(state["alpha_opt"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        sampler_rng.set_state(state["sampler_rng"])
        epoch, step_start, sums = state["epoch"], state["step"], dict(state["sums"])
        history, skipped, streak = list(state["history"]), state["skipped"], state["streak"]

    augmentation = default_augmentation() if config.augment else None
    samples = config.steps_per_epoch * config.batch_size * d.world
    weight_data = PatchDataset(cache, weight_ids, config.patch, samples, config.seed, config.foreground_share, augmentation)
    arch_data = PatchDataset(cache, arch_ids, config.patch, samples, config.seed + 1, config.foreground_share, augmentation)
    val_data = PatchDataset(cache, arch_ids, config.patch, config.val_batches * config.batch_size, config.seed + 2,
                            config.foreground_share, None)
    sample = SAMPLERS[config.sampling]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.amp and d.device.type == "cuda")

    def save(epoch_: int, step_: int) -> None:
        if not d.main:
            return
        if not all(torch.isfinite(p).all() for p in list(net.parameters()) + list(arch.parameters())):
            return  # never replace a good checkpoint with a broken state
        save_checkpoint(checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "version": 1, "config": config.model_dump_json(), "epoch": epoch_,
            "step": step_, "net": net.state_dict(), "arch": arch.state_dict(), "theta_opt": theta_opt.state_dict(),
            "alpha_opt": alpha_opt.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "sampler_rng": sampler_rng.get_state(), "sums": dict(sums),
            "history": history, "skipped": skipped, "streak": streak})

    steps_this_call = 0
    bar = StepBar(progress and d.main, config.steps_per_epoch)
    try:
        while epoch < config.epochs:
            tau = config.tau(epoch)
            for dataset in (weight_data, arch_data):
                dataset.set_epoch(epoch)
            started = time.perf_counter()
            bar.start(f"epoch {epoch + 1}/{config.epochs}", step_start)
            for step, ((xw, yw), (xa, ya)) in enumerate(
                    zip(rank_loader(weight_data, step_start, config.steps_per_epoch, d, config.batch_size, config.workers),
                        rank_loader(arch_data, step_start, config.steps_per_epoch, d, config.batch_size, config.workers)),
                    start=step_start):
                xw, yw, xa, ya = (t.to(d.device) for t in (xw, yw, xa, ya))
                # Theta step on the weight set, alpha fixed.
                with torch.no_grad():
                    weights = {name: sample(alpha, tau, sampler_rng) for name, alpha in arch.alphas.items()}
                with autocast:
                    theta_loss = soft_jaccard_loss(model(xw, weights), yw)
                theta_opt.zero_grad(set_to_none=True)
                ok = _finite(theta_loss)
                if ok:
                    theta_loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
                    ok = bool(torch.isfinite(norm))
                    if ok:
                        theta_opt.step()
                # alpha step on the architecture set, Theta fixed (first-order).
                # Through the plain module, and only alpha's gradients (autograd.grad): Theta's
                # gradient nodes never run, so DDP's hooks on Theta stay out of this step;
                # alpha's gradients are averaged over the ranks by hand.
                weights = {name: sample(alpha, tau, sampler_rng) for name, alpha in arch.alphas.items()}
                with autocast:
                    alpha_loss = soft_jaccard_loss(net(xa, weights), ya)
                alpha_opt.zero_grad(set_to_none=True)
                alpha_ok = _finite(alpha_loss)
                if alpha_ok:
                    alphas = list(arch.alphas.values())
                    for alpha, grad in zip(alphas, torch.autograd.grad(alpha_loss, alphas)):
                        alpha.grad = grad
                    if d.world > 1:
                        for alpha in alphas:
                            dist.all_reduce(alpha.grad)
                            alpha.grad /= d.world
                    alpha_ok = all(torch.isfinite(a.grad).all() for a in alphas)
                    if alpha_ok:
                        alpha_opt.step()
                if ok and alpha_ok:
                    streak = 0
                    sums["theta"] += float(theta_loss.detach())
                    sums["alpha"] += float(alpha_loss.detach())
                    sums["n"] += 1
                else:
                    skipped += 1
                    streak += 1
                    if streak >= config.max_nonfinite:
                        raise SearchError(f"{streak} non-finite losses or gradients in a row at epoch {epoch + 1}, step "
                                          f"{step + 1}; stopped. The last good checkpoint ({checkpoint_path.name}) is "
                                          "kept: lower --theta-lr or check the data", source=str(run))
                bar.advance(f"loss {float(theta_loss.detach()):.4f}  tau {tau:.3f}")
                steps_this_call += 1
                done_epoch = step + 1 == config.steps_per_epoch
                if config.checkpoint_every_steps and (step + 1) % config.checkpoint_every_steps == 0 and not done_epoch:
                    save(epoch, step + 1)
                if stop_after_steps is not None and steps_this_call >= stop_after_steps and not done_epoch:
                    save(epoch, step + 1)
                    return _result(run, epoch, history, skipped)
            bar.stop()
            record = _end_epoch(config, epoch, tau, sums, net, arch, val_data, d, num_classes, skipped,
                                time.perf_counter() - started, theta_opt, autocast)
            scheduler.step(record["theta_loss"] if math.isfinite(record["theta_loss"]) else float("inf"))
            history.append(record)
            if d.main:
                _write_epoch(run, config, arch, epoch, history, record, d.world)
            if on_epoch:
                on_epoch(record)
            epoch, step_start, sums = epoch + 1, 0, {"theta": 0.0, "alpha": 0.0, "n": 0}
            save(epoch, 0)
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                break
    finally:
        bar.stop()
    if d.world > 1:
        gathered = [torch.zeros_like(torch.cat([a.detach().flatten() for a in arch.alphas.values()]))
                    for _ in range(d.world)]
        dist.all_gather(gathered, torch.cat([a.detach().flatten() for a in arch.alphas.values()]))
        if d.main:
            identical = all(torch.equal(gathered[0], g) for g in gathered)
            atomic_write_text(run / "ranks.json", json.dumps({"world_size": d.world, "alpha_identical": identical}) + "\n")
    return _result(run, epoch, history, skipped)


def _result(run: Path, epoch: int, history: list, skipped: int) -> SearchResult:
    return SearchResult(run, epoch, run / "genotype.yaml", history, skipped)


@torch.no_grad()
def _end_epoch(config: SearchConfig, epoch: int, tau: float, sums: dict, net: SuperNet, arch: Architecture,
               val_data: PatchDataset, d: Processes, num_classes: int, skipped: int, seconds: float, theta_opt, autocast
               ) -> dict[str, Any]:
    """The epoch's record: losses, Dice of the currently derived cells on the architecture set, tau, entropy."""
    argmax = {name: torch.nn.functional.one_hot(alpha.argmax(-1), alpha.shape[-1]).float()
              for name, alpha in arch.alphas.items()}
    scores = []
    for index in range(config.val_batches):
        items = [val_data[index * config.batch_size + b] for b in range(config.batch_size)]
        x = torch.stack([item[0] for item in items]).to(d.device)
        y = torch.stack([item[1] for item in items]).to(d.device)
        with autocast:
            prediction = net(x, argmax).argmax(1)
        scores.append(dice_per_class(prediction.cpu(), y.cpu(), num_classes))
    dice = float(np.nanmean(np.array(scores, dtype=float))) if np.isfinite(np.array(scores, dtype=float)).any() else float("nan")
    n = max(sums["n"], 1)
    return {"epoch": epoch + 1, "theta_loss": sums["theta"] / n if sums["n"] else float("nan"),
            "alpha_loss": sums["alpha"] / n if sums["n"] else float("nan"), "architecture_dice": dice, "tau": tau,
            "theta_lr": theta_opt.param_groups[0]["lr"], "alpha_entropy": arch.entropy(), "skipped_steps": skipped,
            "seconds": seconds}


def _write_epoch(run: Path, config: SearchConfig, arch: Architecture, epoch: int, history: list, record: dict,
                 world: int) -> None:
    provenance = {"scnas_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "epoch": epoch + 1,
                  "search": {"data": config.data, "fold": config.fold, "seed": config.seed, "epochs": config.epochs,
                             "sampling": config.sampling, "stem": config.stem, "patch": list(config.patch),
                             "temperature": {"schedule": config.tau_schedule, "max": config.tau_max,
                                             "min": config.tau_min, "at_epoch": record["tau"]},
                             "derivation": f"top-{config.top_k}" if config.top_k else "argmax, zero = no edge",
                             "world_size": world}}
    genotype = derive_genotype(arch.probabilities(), config.nodes, config.ops, config.top_k, provenance)
    write_genotype(genotype, run / "genotypes" / f"epoch_{epoch + 1:04d}.yaml")
    write_genotype(genotype, run / "genotype.yaml")
    lines = "".join(json.dumps(r) + "\n" for r in history)
    atomic_write_text(run / "metrics.jsonl", lines)   # rewritten from the checkpointed history: no duplicates
    from scnas.search.plots import write_plots

    write_plots(run, history, arch, config)


