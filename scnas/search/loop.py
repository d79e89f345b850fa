"""The bi-level search loop (paper, Section 2.2): alternate a Theta step on the weight set
and an alpha step on the architecture set (first-order), anneal tau, derive a genotype every
epoch, checkpoint atomically, resume exactly, and run under torchrun with DDP.

Exact resume: every random draw comes from state that the checkpoint holds (the Gumbel /
pair generator, torch's RNG) or from (seed, epoch, index) (the patches), so a run stopped at
any checkpoint and resumed ends with the same alpha as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from scnas import __version__
from scnas.build.memory_plan import MemoryPlan
from scnas.data import architecture_split, fold_cases
from scnas.data.augment import default_augmentation
from scnas.data.loader import PatchDataset, PatchLoader, resolve_loader_workers, to_device
from scnas.errors import ScnasError
from scnas.fileio import atomic_write_text
from scnas.genotype import write_genotype
from scnas.metrics import LOSSES, jaccard_from_statistics, jaccard_statistics, soft_jaccard_loss
from scnas.engine.runs import RunLoop, read_run_checkpoint, validation_dice
from scnas.search.config import SearchConfig
from scnas.search.derive import alpha_movement, derivation_name, derive_genotype, free_mass
from scnas.search.supernet_memory import plan_search_step
from scnas.search.sampling import argmax_choices, choices_from, draw_all, host_copy
from scnas.search.supernet import Architecture, SuperNet
from scnas.engine.steps import Precision, accumulate_exact, fused_if_available, guarded_step, split_batch

CHECKPOINT_FORMAT = "scnas-search-checkpoint"
CHECKPOINT_VERSION = 2   # 2: the supernet is the builder's U-Net (module names changed), gradient scalers


class SearchError(ScnasError):
    """A search that cannot start or had to stop."""


@dataclass
class SearchResult:
    run: Path
    epochs_done: int
    genotype_path: Path
    _: KW_ONLY
    history: list[dict[str, Any]]
    skipped_steps: int
    plan: MemoryPlan | None = None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a search checkpoint (tensors and plain data only: ``weights_only=True``)."""
    return read_run_checkpoint(path, SearchLoop)


def run_search(config: SearchConfig, run_dir: str | os.PathLike, resume: bool = False, *, progress: bool = True,
               stop_after_steps: int | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
               say: Callable[[str], None] = lambda line: None) -> SearchResult:
    """Run (or with ``resume`` continue) a search into ``run_dir``. ``stop_after_steps`` ends
    this call after that many steps with a checkpoint (to resume); ``on_epoch`` receives each
    epoch's record; ``say`` notices (the cache being prepared).

    Args:
        config: the search's settings.
        run_dir: the run folder (config, metrics, genotypes, plots, checkpoint).
        resume: continue the run in ``run_dir`` from its checkpoint.
        progress: show the progress bar.
        stop_after_steps: end this call after that many steps, checkpointed (to resume).
        on_epoch: called with each epoch's record.
        say: prints notices (the cache being prepared).
    """
    return SearchLoop(config, run_dir, resume, progress=progress, say=say).execute(stop_after_steps, on_epoch=on_epoch)


class SearchLoop(RunLoop):
    """The bi-level search in the shared run skeleton (:class:`scnas.engine.runs.RunLoop`)."""

    kind, error, losses, rate_option = "search", SearchError, ("theta", "alpha"), "--theta-lr"
    checkpoint_format, checkpoint_version = CHECKPOINT_FORMAT, CHECKPOINT_VERSION
    outdated = f"this one resumes version {CHECKPOINT_VERSION} only: start a new search (its genotypes stay valid)"
    occupied = "already holds a search; use --resume to continue it or another folder"
    plan_command, folders = "scnas plan --search", ("genotypes",)
    config: SearchConfig

    def plan_step(self, available: int | None) -> MemoryPlan:
        c = self.config
        return plan_search_step(self.build, c.nodes, c.ops, sampling=c.sampling, amp=self.amp, patch=c.patch,
                                share=self.share, checkpoint=c.checkpoint,
                                micro_batch=c.micro_batch, available=available)

    def setup(self) -> None:
        """The fold's training cases split into the weight and architecture sets."""
        c = self.config
        train_ids, _ = fold_cases(self.cache.splits, c.fold)   # the validation cases stay out of the search
        self.weight_ids, self.arch_ids = architecture_split(train_ids, seed=c.seed,
                                                            architecture_share=c.architecture_share)

    def searched_on(self) -> dict[str, Any]:
        """The data the search saw, for the genotype's provenance: the task's name and every case
        of both halves, so that a cross-validation can tell which of its folds are clean."""
        return {"task": self.cache.header["dataset"]["name"], "cases": sorted({*self.weight_ids, *self.arch_ids})}

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"tau_per_epoch": [c.tau(e) for e in range(c.epochs)],
                "cases": {"weight": self.weight_ids, "architecture": self.arch_ids, "fold": c.fold}}

    def make(self) -> None:
        c, d = self.config, self.d
        self.net = SuperNet(self.build, c.nodes, c.ops).to(d.device)
        self.net.set_checkpointing(self.plan.checkpoint)
        self.arch = Architecture(c.nodes, c.ops, torch.Generator().manual_seed(c.seed)).to(d.device)
        self.model = self.parallel(self.net, find_unused_parameters=True)
        fused = fused_if_available(d.device)
        self.theta_params, self.alphas = list(self.net.parameters()), list(self.arch.alphas.values())
        self.theta_opt = torch.optim.Adam(self.theta_params, lr=c.theta_lr, betas=c.theta_betas, **fused)
        self.alpha_opt = torch.optim.Adam(self.alphas, lr=c.alpha_lr, betas=c.alpha_betas,
                                          weight_decay=c.alpha_weight_decay, **fused)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.theta_opt, factor=c.plateau_factor,
                                                                    patience=c.plateau_patience)
        self.theta_precision, self.alpha_precision = Precision(c.amp, d.device), Precision(c.amp, d.device)
        self.sampler_rng = torch.Generator().manual_seed(c.seed + 1)  # same draws on every rank
        augmentation = default_augmentation() if c.augment else None
        samples = c.steps_per_epoch * c.batch_size
        self.loaders = [PatchLoader(PatchDataset(self.cache, ids, c.patch, samples_per_epoch=samples, seed=seed,
                                                 foreground_share=c.foreground_share,
                                                 augmentation=augmentation), self.share,
                                                 resolve_loader_workers(c.workers, d.device, 2),
                                    world=d.world, rank=d.rank, device=d.device)
                        for ids, seed in ((self.weight_ids, c.seed), (self.arch_ids, c.seed + 1))]
        self.val_data = PatchDataset(self.cache, self.arch_ids, c.patch, samples_per_epoch=c.val_batches * self.share,
                                     seed=c.seed + 2,
                                     foreground_share=c.foreground_share, augmentation=None)

    def restore(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.arch.load_state_dict(state["arch"])
        self.theta_opt.load_state_dict(state["theta_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.theta_precision.load_scaler(state["theta_scaler"])
        self.alpha_precision.load_scaler(state["alpha_scaler"])
        self.sampler_rng.set_state(state["sampler_rng"])

    def snapshot(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "arch": self.arch.state_dict(), "theta_opt": self.theta_opt.state_dict(),
                "alpha_opt": self.alpha_opt.state_dict(), "scheduler": self.scheduler.state_dict(),
                "theta_scaler": self.theta_precision.scaler.state_dict(),
                "alpha_scaler": self.alpha_precision.scaler.state_dict(), "sampler_rng": self.sampler_rng.get_state()}

    def guarded(self) -> list[torch.Tensor]:
        return self.theta_params + self.alphas

    def batches(self, epoch: int, start: int, stop: int):
        self.tau = self.config.tau(epoch)
        self.net.set_aux_skip(self.config.aux_skip_at(epoch))
        return zip(*(loader.epoch(epoch, start, stop) for loader in self.loaders))

    def train_step(self, batch):
        c, d, arch = self.config, self.d, self.arch
        (xw, yw), (xa, ya) = (to_device(b, d.device, c.patch) for b in batch)
        # One copy of alpha to the host decides both steps' operations (alpha is unchanged by
        # the Theta step); every rank draws the same.
        alpha_host = host_copy(arch.alphas)
        theta_draws = draw_all(alpha_host, c.sampling, self.tau, generator=self.sampler_rng)
        alpha_draws = draw_all(alpha_host, c.sampling, self.tau, generator=self.sampler_rng)
        # Theta step on the weight set, alpha fixed.
        with torch.no_grad():
            theta_choices = choices_from(arch.alphas, theta_draws, self.tau)
        self.theta_opt.zero_grad(set_to_none=True)
        theta_loss = accumulate_exact(lambda x: self.model(x, theta_choices), split_batch(xw, yw, self.plan.micro_batch),
                                      self.theta_precision.backward, precision=self.theta_precision, world=d.world,
                                      no_sync=self.model.no_sync if d.world > 1 else None,
                                      foreground_only=LOSSES[c.loss])
        theta_skipped = guarded_step(self.theta_opt, self.theta_params, self.theta_precision, loss=theta_loss,
                                     max_norm=c.grad_clip)
        self.theta_opt.zero_grad(set_to_none=True)   # free Theta's gradients before the alpha step
        if self.epoch < c.warmup_epochs:             # warm-up: alpha stays, its loss is measured
            alpha_loss, alpha_skipped = self._alpha_loss(xa, ya, alpha_draws), torch.zeros_like(theta_skipped)
        else:
            alpha_loss, alpha_skipped = self._alpha_step(xa, ya, alpha_draws)
        skipped = theta_skipped | alpha_skipped
        failed = ~(torch.isfinite(theta_loss) & torch.isfinite(alpha_loss)) \
            if self.theta_precision.scaler.is_enabled() else skipped
        return [theta_loss, alpha_loss], skipped, failed

    def _alpha_step(self, x: torch.Tensor, y: torch.Tensor, draws):
        """alpha step on the architecture set, Theta fixed (first-order), through the plain module
        and for alpha only (autograd.grad): DDP's hooks on Theta stay out of it; alpha's
        gradients are averaged over the ranks by hand."""
        totals: list[torch.Tensor] = []

        def backward(surrogate: torch.Tensor) -> None:
            grads = self.alpha_precision.gradients(surrogate, self.alphas)
            if totals:
                for total, grad in zip(totals, grads):
                    total += grad
            else:
                totals.extend(grads)

        loss = accumulate_exact(lambda v: self.net(v, choices_from(self.arch.alphas, draws, self.tau)),
                                split_batch(x, y, self.plan.micro_batch), backward, precision=self.alpha_precision,
                                world=self.d.world, foreground_only=LOSSES[self.config.loss])
        if self.d.world > 1:
            flat = torch.cat([t.flatten() for t in totals])
            dist.all_reduce(flat)
            totals = list((flat / self.d.world).split([a.numel() for a in self.alphas]))
        if self.config.free_penalty:
            backward(self.config.free_penalty * free_mass(self.alphas, self.config.ops))
        for alpha, grad in zip(self.alphas, totals):
            alpha.grad = grad.view_as(alpha)
        skipped = guarded_step(self.alpha_opt, self.alphas, self.alpha_precision, loss=loss)
        self.alpha_opt.zero_grad(set_to_none=True)
        return loss, skipped

    def _alpha_loss(self, x: torch.Tensor, y: torch.Tensor, draws) -> torch.Tensor:
        """The alpha objective on the architecture set without a step (warm-up), exact over micro-batches."""
        with torch.no_grad(), self.alpha_precision.autocast():
            choices = choices_from(self.arch.alphas, draws, self.tau)
            statistics = sum(jaccard_statistics(self.net(xb, choices), yb)
                             for xb, yb in split_batch(x, y, self.plan.micro_batch))
        if self.d.world > 1:
            dist.all_reduce(statistics)
        return jaccard_from_statistics(statistics, foreground_only=LOSSES[self.config.loss])

    def hessian_eigenvalue(self) -> float:
        """R-DARTS's indicator: the dominant eigenvalue of the alpha loss's Hessian on the first
        architecture-set patches, for draws and a start vector seeded by (seed, epoch) so that
        the search's own random streams are untouched (exact resume holds)."""
        from scnas.search.hessian import dominant_eigenvalue

        c = self.config
        generator = torch.Generator().manual_seed(c.seed * 100_003 + self.epoch)
        draws = draw_all(host_copy(self.arch.alphas), c.sampling, self.tau, generator=generator)
        items = [self.val_data[i] for i in range(min(self.share, len(self.val_data)))]
        x = torch.stack([item[0] for item in items]).to(self.d.device)
        y = torch.stack([item[1] for item in items]).to(self.d.device)
        loss = soft_jaccard_loss(self.net(x, choices_from(self.arch.alphas, draws, self.tau)), y,
                                 foreground_only=LOSSES[c.loss])
        return dominant_eigenvalue(loss, self.alphas, c.hessian_iterations, generator=generator)

    def progress_text(self, numbers: dict) -> str:
        return f"{super().progress_text(numbers)}  tau {self.tau:.3f}"

    def epoch_record(self, means: dict[str, float], skipped: int, seconds: float) -> dict[str, Any]:
        """Losses, the Dice of the currently derived cells on the architecture set, tau, entropy."""
        argmax = argmax_choices(self.arch.alphas)
        dice = validation_dice(lambda x: self.net(x, argmax), self.val_data, self.share,
                               num_classes=self.build.num_classes,
                               device=self.d.device, precision=self.theta_precision)
        return {"epoch": self.epoch + 1, "theta_loss": means["theta"], "alpha_loss": means["alpha"],
                "architecture_dice": dice, "tau": self.tau, "theta_lr": self.theta_opt.param_groups[0]["lr"],
                "alpha_entropy": self.arch.entropy(),
                "alpha_largest_x_uniform": {name: m["largest_x_uniform"]
                                            for name, m in alpha_movement(self.arch.probabilities()).items()},
                "skipped_steps": skipped, "seconds": seconds,
                **({"alpha_hessian_eigenvalue": self.hessian_eigenvalue()} if self.config.hessian_iterations else {}),
                **({"warm_up": True} if self.epoch < self.config.warmup_epochs else {})}

    def write_epoch(self, record: dict[str, Any], draw: bool) -> None:
        _write_epoch(self.run, self.config, self.arch, record, self.d.world, self.searched_on())
        from scnas.search.plots import write_plots

        write_plots(self.run, self.history, self.arch, config=self.config, draw=draw)

    def finish(self) -> None:
        """Under torchrun: check that every rank ends with the same alpha (ranks.json)."""
        if self.d.world > 1:
            mine = torch.cat([a.detach().flatten() for a in self.arch.alphas.values()])
            gathered = [torch.zeros_like(mine) for _ in range(self.d.world)]
            dist.all_gather(gathered, mine)
            if self.d.main:
                identical = all(torch.equal(gathered[0], g) for g in gathered)
                atomic_write_text(self.run / "ranks.json",
                                  json.dumps({"world_size": self.d.world, "alpha_identical": identical}) + "\n")

    def result(self) -> SearchResult:
        return SearchResult(self.run, self.epoch, self.run / "genotype.yaml", history=self.history,
                            skipped_steps=int(self.counts["skipped"]),
                            plan=self.plan)


def _write_epoch(run: Path, config: SearchConfig, arch: Architecture, record: dict, world: int,
                 searched_on: dict[str, Any]) -> None:
    """The epoch's genotype (genotypes/epoch_NNNN.yaml and genotype.yaml), with its provenance."""
    provenance = {"scnas_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "epoch": record["epoch"],
                  "search": {"data": config.data, "fold": config.fold, "seed": config.seed, "epochs": config.epochs,
                             "sampling": config.sampling, "stem": config.stem, "patch": list(config.patch),
                             "temperature": {"schedule": config.tau_schedule, "max": config.tau_max,
                                             "min": config.tau_min, "at_epoch": record["tau"]},
                             "derivation": derivation_name(config.derive, config.top_k, config.max_free),
                             "loss": config.loss,
                             **countermeasures(config),
                             "world_size": world, **searched_on}}
    genotype = derive_genotype(arch.probabilities(), config.nodes, config.ops,
                               top_k=config.top_k if config.derive == "top-k" else None, provenance=provenance,
                               max_free=config.max_free)
    write_genotype(genotype, run / "genotypes" / f"epoch_{record['epoch']:04d}.yaml")
    write_genotype(genotype, run / "genotype.yaml")


def countermeasures(config: SearchConfig) -> dict[str, Any]:
    """The countermeasures to collapse a search used, for its genotypes' provenance (none: {})."""
    used = {"warmup_epochs": config.warmup_epochs, "free_penalty": config.free_penalty, "aux_skip": config.aux_skip}
    return {"countermeasures": {k: v for k, v in used.items() if v}} if any(used.values()) else {}

