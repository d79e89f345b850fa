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
from scnas.metrics import dice_per_class
from scnas.build.memory import MemoryPlan, MemoryPlanError
from scnas.data import architecture_split, fold_cases
from scnas.data.augment import default_augmentation
from scnas.data.loader import PatchDataset, PatchLoader, resolve_loader_workers, to_device
from scnas.errors import ScnasError
from scnas.fileio import atomic_write_text
from scnas.genotype import write_genotype
from scnas.search.config import SearchConfig
from scnas.metrics import LOSSES
from scnas.search.derive import alpha_movement, derivation_name, derive_genotype
from scnas.search.memory import plan_search_step
from scnas.search.sampling import argmax_choices, choices_from, draw_all, host_copy
from scnas.search.supernet import Architecture, SuperNet
from scnas.checkpoints import check_resume_precision, check_resume_settings, read_checkpoint, save_checkpoint
from scnas.figures import PLOT_EVERY_SECONDS
from scnas.processes import Processes, memory_budget, setup_processes
from scnas.progress import StepBar
from scnas.runs import ensure_run_folder, open_or_prepare
from scnas.steps import (Precision, StepMeter, accumulate_exact, fused_if_available, guarded_step, out_of_memory,
                         read_checked, resolve_amp, split_batch)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "scnas-search-checkpoint"
CHECKPOINT_VERSION = 2   # 2: the supernet is the builder's U-Net (module names changed), gradient scalers


class SearchError(ScnasError):
    """A search that cannot start or had to stop."""


@dataclass
class SearchResult:
    run: Path
    epochs_done: int
    genotype_path: Path
    history: list[dict[str, Any]]
    skipped_steps: int
    plan: MemoryPlan | None = None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a search checkpoint (tensors and plain data only: ``weights_only=True``)."""
    state = read_checkpoint(path, CHECKPOINT_FORMAT, SearchError)
    if state.get("version") != CHECKPOINT_VERSION:
        raise SearchError(f"is a version-{state.get('version')} search checkpoint from an older scnas; this one resumes "
                          f"version {CHECKPOINT_VERSION} only: start a new search (its genotypes stay valid)",
                          source=str(path))
    return state


def plan_search(config: SearchConfig, build: BuildConfig, d: Processes) -> MemoryPlan:
    """Checkpointing and micro-batch for this search; refuses a setting that cannot fit (the
    budget: ``config.gpu_memory``, else the CUDA device's free memory; none on the CPU)."""
    available = memory_budget(config.gpu_memory, d)
    try:
        return plan_search_step(build, config.nodes, config.ops, config.sampling, resolve_amp(config.amp, d.device),
                                config.patch, config.batch_size // d.world, config.checkpoint, config.micro_batch,
                                available)
    except MemoryPlanError as exc:
        raise SearchError(f"does not fit: {exc}") from None


def run_search(config: SearchConfig, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
               stop_after_steps: int | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
               say: Callable[[str], None] = lambda line: None) -> SearchResult:
    """Run (or with ``resume`` continue) a search into ``run_dir``. ``stop_after_steps`` ends
    the run cleanly after that many steps in this call (for time-boxing and tests); ``say``
    receives notices (where a task folder is prepared)."""
    run = Path(run_dir)
    d = setup_processes(config.device, SearchError)
    if config.batch_size % d.world:
        raise SearchError(f"--batch-size {config.batch_size} is the global batch and must be a multiple of the "
                          f"{d.world} processes (e.g. {d.world * max(1, config.batch_size // d.world)})")
    checkpoint_path = run / CHECKPOINT
    state: dict[str, Any] | None = None
    if resume:
        if not checkpoint_path.exists():
            raise SearchError("has no checkpoint to resume from", source=str(run))
        state = load_checkpoint(checkpoint_path)
        saved = SearchConfig.model_validate_json(state["config"])
        if config.spacing is None:   # not asked for: the run's own (resolved when it started)
            config = config.model_copy(update={"spacing": saved.spacing})
        check_resume_settings(saved, config, run, SearchError)
    elif checkpoint_path.exists():
        raise SearchError("already holds a search; use --resume to continue it or another folder", source=str(run))
    if d.main:
        ensure_run_folder(run / "genotypes", SearchError)
    d.barrier()
    cache = open_or_prepare(config.data, config.spacing, d, say)
    config = config.model_copy(update={"spacing": cache.spacing})   # recorded as used (a cache has its own)
    train_ids, _ = fold_cases(cache.splits, config.fold)
    weight_ids, arch_ids = architecture_split(train_ids, seed=config.seed, architecture_share=config.architecture_share)
    num_classes = len(cache.labels)
    build = BuildConfig(stem_channels=config.stem, in_channels=len(cache.channel_names), num_classes=num_classes,
                        depth=config.depth)
    if any(p % build.divisor for p in config.patch):
        raise SearchError(f"patch {config.patch} must be a multiple of 2**depth = {build.divisor} per axis")
    plan = plan_search(config, build, d)
    share = config.batch_size // d.world
    if d.main:
        atomic_write_text(run / "config.json", json.dumps({
            "scnas_version": __version__, "search": config.model_dump(mode="json"), "build": build.model_dump(),
            "tau_per_epoch": [config.tau(e) for e in range(config.epochs)], "world_size": d.world,
            "memory_plan": plan.to_dict(), "amp": resolve_amp(config.amp, d.device), "threads": torch.get_num_threads(),
            "cases": {"weight": weight_ids, "architecture": arch_ids, "fold": config.fold}}, indent=2) + "\n")

    torch.manual_seed(config.seed)
    net = SuperNet(build, config.nodes, config.ops).to(d.device)
    net.set_checkpointing(plan.checkpoint)
    arch = Architecture(config.nodes, config.ops, torch.Generator().manual_seed(config.seed)).to(d.device)
    model: torch.nn.Module = net
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True, gradient_as_bucket_view=True,
                                                          device_ids=[d.device] if d.device.type == "cuda" else None)
    fused = fused_if_available(d.device)
    theta_params = list(net.parameters())
    alphas = list(arch.alphas.values())
    theta_opt = torch.optim.Adam(theta_params, lr=config.theta_lr, betas=config.theta_betas, **fused)
    alpha_opt = torch.optim.Adam(alphas, lr=config.alpha_lr, betas=config.alpha_betas,
                                 weight_decay=config.alpha_weight_decay, **fused)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(theta_opt, factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    theta_precision, alpha_precision = Precision(config.amp, d.device), Precision(config.amp, d.device)
    sampler_rng = torch.Generator().manual_seed(config.seed + 1)  # same draws on every rank
    epoch, step_start, sums, history = 0, 0, {"theta": 0.0, "alpha": 0.0, "n": 0}, []
    counters = {"skipped": 0, "streak": 0, "skips": 0}
    if state is not None:
        net.load_state_dict(state["net"])
        arch.load_state_dict(state["arch"])
        theta_opt.load_state_dict(state["theta_opt"])
        alpha_opt.load_state_dict(state["alpha_opt"])
        scheduler.load_state_dict(state["scheduler"])
        check_resume_precision(state.get("amp"), theta_precision.amp, run, SearchError)
        theta_precision.load_scaler(state["theta_scaler"])
        alpha_precision.load_scaler(state["alpha_scaler"])
        torch.set_rng_state(state["torch_rng"])
        sampler_rng.set_state(state["sampler_rng"])
        epoch, step_start, sums, history = state["epoch"], state["step"], dict(state["sums"]), list(state["history"])
        counters = {"skipped": state["skipped"], "streak": state["streak"], "skips": state.get("skips", 0)}

    augmentation = default_augmentation() if config.augment else None
    samples = config.steps_per_epoch * config.batch_size
    weight_data = PatchDataset(cache, weight_ids, config.patch, samples, config.seed, config.foreground_share, augmentation)
    arch_data = PatchDataset(cache, arch_ids, config.patch, samples, config.seed + 1, config.foreground_share, augmentation)
    val_data = PatchDataset(cache, arch_ids, config.patch, config.val_batches * share, config.seed + 2,
                            config.foreground_share, None)
    no_sync = model.no_sync if d.world > 1 else None
    workers = resolve_loader_workers(config.workers, d.device, loaders=2)
    weight_loader, arch_loader = (PatchLoader(data, share, workers, d.world, d.rank, d.device)
                                  for data in (weight_data, arch_data))

    def save(epoch_: int, step_: int, meter: StepMeter) -> None:
        if not d.main:
            return
        if not all(torch.isfinite(p).all() for p in theta_params + alphas):
            return  # never replace a good checkpoint with a broken state
        numbers = meter.read()
        save_checkpoint(checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config.model_dump_json(),
            "epoch": epoch_, "step": step_, "net": net.state_dict(), "arch": arch.state_dict(),
            "theta_opt": theta_opt.state_dict(), "alpha_opt": alpha_opt.state_dict(), "scheduler": scheduler.state_dict(),
            "amp": theta_precision.amp, "theta_scaler": theta_precision.scaler.state_dict(),
            "alpha_scaler": alpha_precision.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(), "sampler_rng": sampler_rng.get_state(),
            "sums": {"theta": numbers["theta"], "alpha": numbers["alpha"], "n": numbers["n"]}, "history": history,
            "skipped": numbers["skipped"], "streak": numbers["streak"], "skips": numbers["skips"]})

    def check(meter: StepMeter, step: int) -> dict[str, Any]:
        return read_checked(meter, config.max_nonfinite, SearchError, epoch, step, checkpoint_path, "--theta-lr")

    def alpha_gradients(draws) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: net(x, choices_from(arch.alphas, draws, tau))

    steps_this_call, last_drawn = 0, time.monotonic()
    bar = StepBar(progress and d.main, config.steps_per_epoch)
    try:
        while epoch < config.epochs:
            tau = config.tau(epoch)
            started = time.perf_counter()
            meter = StepMeter(d.device, ["theta", "alpha"], {**sums, **counters})
            bar.start(f"epoch {epoch + 1}/{config.epochs}", step_start)
            loaders = (weight_loader.epoch(epoch, step_start, config.steps_per_epoch),
                       arch_loader.epoch(epoch, step_start, config.steps_per_epoch))
            for step, (weight_batch, arch_batch) in enumerate(zip(*loaders), start=step_start):
                (xw, yw), (xa, ya) = (to_device(b, d.device, config.patch) for b in (weight_batch, arch_batch))
                # One copy of alpha to the host decides both steps' operations (alpha is
                # unchanged by the Theta step); every rank draws the same.
                alpha_host = host_copy(arch.alphas)
                theta_draws = draw_all(alpha_host, config.sampling, tau, sampler_rng)
                alpha_draws = draw_all(alpha_host, config.sampling, tau, sampler_rng)
                # Theta step on the weight set, alpha fixed.
                with torch.no_grad():
                    theta_choices = choices_from(arch.alphas, theta_draws, tau)
                theta_opt.zero_grad(set_to_none=True)
                theta_loss = accumulate_exact(lambda x: model(x, theta_choices), split_batch(xw, yw, plan.micro_batch),
                                              theta_precision.backward, theta_precision, d.world, no_sync,
                                              foreground_only=LOSSES[config.loss])
                theta_skipped = guarded_step(theta_opt, theta_params, theta_precision, theta_loss, config.grad_clip)
                theta_opt.zero_grad(set_to_none=True)   # free Theta's gradients before the alpha step
                # alpha step on the architecture set, Theta fixed (first-order), through the plain
                # module and for alpha only (autograd.grad): DDP's hooks on Theta stay out of it;
                # alpha's gradients are averaged over the ranks by hand.
                totals: list[torch.Tensor] = []

                def alpha_backward(surrogate: torch.Tensor) -> None:
                    grads = alpha_precision.gradients(surrogate, alphas)
                    if totals:
                        for total, grad in zip(totals, grads):
                            total += grad
                    else:
                        totals.extend(grads)

                alpha_loss = accumulate_exact(alpha_gradients(alpha_draws), split_batch(xa, ya, plan.micro_batch),
                                              alpha_backward, alpha_precision, d.world,
                                              foreground_only=LOSSES[config.loss])
                if d.world > 1:
                    flat = torch.cat([t.flatten() for t in totals])
                    dist.all_reduce(flat)
                    totals = list((flat / d.world).split([a.numel() for a in alphas]))
                for alpha, grad in zip(alphas, totals):
                    alpha.grad = grad.view_as(alpha)
                alpha_skipped = guarded_step(alpha_opt, alphas, alpha_precision, alpha_loss)
                alpha_opt.zero_grad(set_to_none=True)
                losses_finite = torch.isfinite(theta_loss) & torch.isfinite(alpha_loss)
                skipped = theta_skipped | alpha_skipped
                meter.record([theta_loss, alpha_loss], skipped,
                             ~losses_finite if theta_precision.scaler.is_enabled() else skipped)
                steps_this_call += 1
                done_epoch = step + 1 == config.steps_per_epoch
                if (step + 1) % config.log_every_steps == 0 or done_epoch:
                    numbers = check(meter, step)
                    bar.advance(f"loss {numbers['theta'] / max(numbers['n'], 1):.4f}  tau {tau:.3f}",
                                steps=step + 1)
                if config.checkpoint_every_steps and (step + 1) % config.checkpoint_every_steps == 0 and not done_epoch:
                    check(meter, step)
                    save(epoch, step + 1, meter)
                if stop_after_steps is not None and steps_this_call >= stop_after_steps and not done_epoch:
                    check(meter, step)
                    save(epoch, step + 1, meter)
                    return _result(run, epoch, history, meter.read()["skipped"], plan)
            bar.stop()
            numbers = check(meter, config.steps_per_epoch - 1)
            sums = {"theta": numbers["theta"], "alpha": numbers["alpha"], "n": numbers["n"]}
            counters = {"skipped": numbers["skipped"], "streak": numbers["streak"], "skips": numbers["skips"]}
            record = _end_epoch(EpochEnd(config, epoch, tau, sums, counters["skipped"], time.perf_counter() - started),
                                net, arch, val_data, d, num_classes, theta_opt, theta_precision, share)
            scheduler.step(record["theta_loss"] if math.isfinite(record["theta_loss"]) else float("inf"))
            history.append(record)
            if d.main:
                draw = config.plots and (epoch + 1 == config.epochs
                                         or time.monotonic() - last_drawn >= PLOT_EVERY_SECONDS)
                _write_epoch(run, config, arch, epoch, history, record, d.world, draw)
                last_drawn = time.monotonic() if draw else last_drawn
            if on_epoch:
                on_epoch(record)
            epoch, step_start, sums = epoch + 1, 0, {"theta": 0.0, "alpha": 0.0, "n": 0}
            save(epoch, 0, StepMeter(d.device, ["theta", "alpha"], {**sums, **counters}))
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                break
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(SearchError, epoch, plan.describe(), checkpoint_path, "scnas plan --search") from None
    finally:
        bar.stop()
    if d.world > 1:
        gathered = [torch.zeros_like(torch.cat([a.detach().flatten() for a in arch.alphas.values()]))
                    for _ in range(d.world)]
        dist.all_gather(gathered, torch.cat([a.detach().flatten() for a in arch.alphas.values()]))
        if d.main:
            identical = all(torch.equal(gathered[0], g) for g in gathered)
            atomic_write_text(run / "ranks.json", json.dumps({"world_size": d.world, "alpha_identical": identical}) + "\n")
    return _result(run, epoch, history, counters["skipped"], plan)


def _result(run: Path, epoch: int, history: list, skipped: int, plan: MemoryPlan | None = None) -> SearchResult:
    return SearchResult(run, epoch, run / "genotype.yaml", history, skipped, plan)


@dataclass
class EpochEnd:
    """What an epoch's record is made of besides the networks."""

    config: SearchConfig
    epoch: int
    tau: float
    sums: dict
    skipped: int
    seconds: float


@torch.no_grad()
def _end_epoch(end: EpochEnd, net: SuperNet, arch: Architecture, val_data: PatchDataset, d: Processes, num_classes: int,
               theta_opt, precision: Precision, share: int) -> dict[str, Any]:
    """The epoch's record: losses, Dice of the currently derived cells on the architecture set, tau, entropy."""
    config, sums = end.config, end.sums
    argmax = argmax_choices(arch.alphas)
    scores = []
    for index in range(config.val_batches):
        items = [val_data[index * share + b] for b in range(share)]
        x = torch.stack([item[0] for item in items]).to(d.device)
        y = torch.stack([item[1] for item in items])
        with precision.autocast():
            prediction = net(x, argmax).argmax(1)
        scores.append(dice_per_class(prediction.cpu(), y, num_classes))
    dice = float(np.nanmean(np.array(scores, dtype=float))) if np.isfinite(np.array(scores, dtype=float)).any() else float("nan")
    n = max(sums["n"], 1)
    return {"epoch": end.epoch + 1, "theta_loss": sums["theta"] / n if sums["n"] else float("nan"),
            "alpha_loss": sums["alpha"] / n if sums["n"] else float("nan"), "architecture_dice": dice, "tau": end.tau,
            "theta_lr": theta_opt.param_groups[0]["lr"], "alpha_entropy": arch.entropy(),
            "alpha_largest_x_uniform": {name: m["largest_x_uniform"]
                                        for name, m in alpha_movement(arch.probabilities()).items()},
            "skipped_steps": end.skipped, "seconds": end.seconds}




def _write_epoch(run: Path, config: SearchConfig, arch: Architecture, epoch: int, history: list, record: dict,
                 world: int, draw: bool = True) -> None:
    provenance = {"scnas_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "epoch": epoch + 1,
                  "search": {"data": config.data, "fold": config.fold, "seed": config.seed, "epochs": config.epochs,
                             "sampling": config.sampling, "stem": config.stem, "patch": list(config.patch),
                             "temperature": {"schedule": config.tau_schedule, "max": config.tau_max,
                                             "min": config.tau_min, "at_epoch": record["tau"]},
                             "derivation": derivation_name(config.derive, config.top_k), "loss": config.loss,
                             "world_size": world}}
    genotype = derive_genotype(arch.probabilities(), config.nodes, config.ops,
                               config.top_k if config.derive == "top-k" else None, provenance)
    write_genotype(genotype, run / "genotypes" / f"epoch_{epoch + 1:04d}.yaml")
    write_genotype(genotype, run / "genotype.yaml")
    lines = "".join(json.dumps(r) + "\n" for r in history)
    atomic_write_text(run / "metrics.jsonl", lines)   # rewritten from the checkpointed history: no duplicates
    from scnas.search.plots import write_plots

    write_plots(run, history, arch, config, draw)


