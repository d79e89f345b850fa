"""The skeleton that search and training share (:class:`RunLoop`): the run folder and its
resume guard, the data (prepared by the main process under torchrun), the network settings
and memory plan, ``config.json``, the epoch and step loop with its progress bar, loss
bookkeeping and non-finite policy, validation Dice, ``metrics.jsonl``, figures at most every
few minutes, atomic checkpoints that never replace a good state with a broken one, exact
resume, and the out-of-memory message. A kind of run (``scnas.search.loop.SearchLoop``,
``scnas.train.trainer.TrainingLoop``) fills in its networks and optimisers, one step, an
epoch's record and files, and its checkpoint's extra state; a fix here is a fix to both."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from scnas import __version__
from scnas.build import BuildConfig
from scnas.build.memory_plan import MemoryPlan, MemoryPlanError
from scnas.engine.checkpoints import (CHECKPOINT_FIX, check_resume_precision, check_resume_settings, read_checkpoint,
                               save_checkpoint)
from scnas.errors import ScnasError
from scnas.figures import PLOT_EVERY_SECONDS
from scnas.fileio import atomic_write_text, ensure_folder
from scnas.metrics import dice_per_class
from scnas.engine.processes import Processes, memory_budget, setup_processes
from scnas.progress import StepBar
from scnas.records import check_shape, damaged, read_json
from scnas.engine.settings import RunSettings
from scnas.engine.steps import Precision, StepMeter, out_of_memory, read_checked, resolve_amp

CHECKPOINT = "checkpoint.pt"
RUN_CONFIG_FIX = ("--resume cannot read the run's settings from it: start the run again in another folder, or put "
                  "back a good copy of the file")


def read_run_config(path: Path, *sections: str) -> dict[str, Any]:
    """A run's ``config.json`` with these ``sections`` (objects), or a ``DamagedFileError``."""
    from pydantic import create_model

    shape = create_model("RunConfigFile", __config__=ConfigDict(extra="allow"),
                         **{name: (dict[str, Any], ...) for name in sections})
    return read_json(path, RUN_CONFIG_FIX, shape)
COUNTERS = ("skipped", "streak", "skips")
"""What a run counts across epochs: skipped steps, and the current runs of non-finite losses
and of skipped steps (a run of non-finite losses may continue into the next epoch)."""


class RunLoop:
    """One search or training run into a folder, as a chain of named steps (the shape of
    nnU-Net's trainer). The constructor only stores its arguments; :meth:`execute` runs

    1. :meth:`initialize`: processes, the run folder and its resume guard, the data, the
       ``BuildConfig`` and the memory plan (the kind's error for a setting or folder it cannot
       use); then the kind's :meth:`setup`;
    2. :meth:`on_run_start`: ``config.json``, the seed, :meth:`make`, a resumed state, :meth:`warm_up`;
    3. per epoch, while epochs are left and :meth:`keep_going`: :meth:`on_epoch_start`,
       :meth:`run_steps` (:meth:`train_step` on each of :meth:`batches`, checkpoints inside
       the epoch), :meth:`on_epoch_end` (:meth:`epoch_record`, the plateau, ``metrics.jsonl``,
       :meth:`write_epoch`, the checkpoint);
    4. :meth:`finish`, then :meth:`result`.

    A kind of run sets the class attributes and fills in the hooks (the methods that raise
    ``NotImplementedError`` must be filled in; the others have a default)."""

    kind: ClassVar[str]                      # the key of the settings in config.json
    error: ClassVar[type[ScnasError]]
    checkpoint_format: ClassVar[str]
    checkpoint_version: ClassVar[int]
    outdated: ClassVar[str]                  # why a checkpoint of another version cannot be continued
    occupied: ClassVar[str]                  # the message for a folder that already holds a run
    losses: ClassVar[tuple[str, ...]]        # what a step returns; the first drives the learning rate plateau
    rate_option: ClassVar[str]               # the option to lower when losses stop being finite
    plan_command: ClassVar[str]              # the command that shows what fits
    folders: ClassVar[tuple[str, ...]] = ()  # made in the run folder
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau

    def __init__(self, config: RunSettings, run_dir, resume: bool = False, *, progress: bool = True,
                 say: Callable[[str], None] = lambda line: None):
        """Store the settings; nothing is started, read or written before :meth:`execute`.

        Args:
            config: the run's settings (``SearchConfig`` or ``TrainConfig``).
            run_dir: the run folder (made if missing; one that holds a run needs ``resume``).
            resume: continue the run in ``run_dir`` from its checkpoint.
            progress: show the progress bar (main process only).
            say: prints notices (the cache being prepared, compile times).
        """
        self.config, self.run, self.resume, self.progress, self.say = config, Path(run_dir), resume, progress, say
        self.checkpoint_path = self.run / CHECKPOINT
        self.state: dict[str, Any] | None = None   # a checkpoint to resume from, once read
        self.initialized = False
        self.epoch, self.step, self.history = 0, 0, []
        self.counts: dict[str, float] = self._fresh_counts(dict.fromkeys(COUNTERS, 0))

    def execute(self, stop_after_steps: int | None = None, stop_after_epochs: int | None = None,
                on_epoch: Callable[[dict[str, Any]], None] | None = None):
        """Run until the last epoch (or :meth:`keep_going` says stop), or for
        ``stop_after_steps`` steps / ``stop_after_epochs`` epochs of this call (then
        checkpointed, to resume); ``on_epoch`` receives each epoch's record. Returns :meth:`result`."""
        self.initialize()
        self.on_run_start()
        budget = _Budget(stop_after_steps, stop_after_epochs)
        bar = StepBar(self.progress and self.d.main, self.config.steps_per_epoch)
        try:
            while self.epoch < self.config.epochs and self.keep_going():
                meter, started = self.on_epoch_start(bar)
                if not self.run_steps(meter, bar, budget):
                    return self.result()          # stopped inside the epoch, checkpointed
                bar.stop()
                self.on_epoch_end(meter, started, on_epoch)
                budget.epochs_done += 1
                if budget.spent():
                    break
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory(self.error, self.epoch, self.plan.describe(), checkpoint=self.checkpoint_path,
                                plan_command=self.plan_command) from None
        finally:
            bar.stop()
        self.finish()
        return self.result()

    # ---- the chain ---------------------------------------------------------------------------

    def initialize(self) -> None:
        """The heavy setup, once: join the processes (torchrun) and pick the device; check the
        batch against them; the resume guard or the occupied-folder check; the run folders;
        the data (prepared by the main process); the ``BuildConfig`` and the patch check; the
        memory plan (:meth:`plan_step`); then the kind's :meth:`setup`."""
        if self.initialized:
            return
        config = self.config
        self.d = d = setup_processes(config.device, self.error)
        if config.batch_size % d.world:
            raise self.error(f"--batch-size {config.batch_size} is the global batch and must be a multiple of the "
                             f"{d.world} processes (e.g. {d.world * max(1, config.batch_size // d.world)})")
        if self.resume:
            config = self._resume_guard(config)
        elif self.checkpoint_path.exists():
            raise self.error(self.occupied, source=str(self.run))
        if d.main:
            for folder in (self.run, *(self.run / name for name in self.folders)):
                ensure_folder(folder, self.error, "a run folder")
        d.barrier()
        self.cache = open_or_prepare(config.data, config.spacing, d, say=self.say)
        self.config = config = config.model_copy(update={"spacing": self.cache.spacing})   # as used
        self.build = BuildConfig(stem_channels=config.stem, in_channels=len(self.cache.channel_names),
                                 num_classes=len(self.cache.labels), depth=config.depth, **self.build_settings())
        if any(p % self.build.divisor for p in config.patch):
            raise self.error(f"patch {config.patch} must be a multiple of 2**depth = {self.build.divisor} per axis")
        self.share, self.amp = config.batch_size // d.world, resolve_amp(config.amp, d.device)
        try:
            self.plan: MemoryPlan = self.plan_step(memory_budget(config.gpu_memory, d))
        except MemoryPlanError as exc:
            raise self.error(f"does not fit: {exc}") from None
        self.setup()
        self.initialized = True

    def on_run_start(self) -> None:
        """``config.json`` (main process), the seed, :meth:`make`, the resumed state, :meth:`warm_up`."""
        config, d = self.config, self.d
        if d.main:
            atomic_write_text(self.run / "config.json", json.dumps({
                "scnas_version": __version__, self.kind: config.model_dump(mode="json"),
                "build": self.build.model_dump(),
                **self.describe(), "world_size": d.world, "memory_plan": self.plan.to_dict(), "amp": self.amp,
                "threads": torch.get_num_threads()}, indent=2) + "\n")
        torch.manual_seed(config.seed)
        self.make()
        if self.state is not None:
            self._restore(self.state)
        self.warm_up()
        self.last_drawn = time.monotonic()

    def on_epoch_start(self, bar: StepBar) -> tuple[StepMeter, float]:
        """A fresh loss meter (carrying the counters) and the epoch's start time; the bar restarts."""
        meter = StepMeter(self.d.device, self.losses, self.counts)
        bar.start(f"epoch {self.epoch + 1}/{self.config.epochs}", self.step)
        return meter, time.perf_counter()

    def run_steps(self, meter: StepMeter, bar: StepBar, budget: _Budget) -> bool:
        """The epoch's remaining steps: :meth:`train_step` on each of :meth:`batches`, the losses
        read back every ``log_every_steps``, a checkpoint every ``checkpoint_every_steps``.
        False when the step budget ran out inside the epoch (checkpointed there, to resume)."""
        config = self.config
        for step, batch in enumerate(self.batches(self.epoch, self.step, config.steps_per_epoch), start=self.step):
            meter.record(*self.train_step(batch))
            budget.steps_done += 1
            last = step + 1 == config.steps_per_epoch
            if (step + 1) % config.log_every_steps == 0 or last:
                bar.advance(self.progress_text(self._checked(meter, step)), steps=step + 1)
            stop = budget.steps_spent()
            every = config.checkpoint_every_steps
            if not last and (stop or (every and (step + 1) % every == 0)):
                self._checked(meter, step)
                self.step = step + 1
                self._save(meter)
                if stop:
                    return False
        return True

    def on_epoch_end(self, meter: StepMeter, started: float, on_epoch) -> None:
        """The epoch's losses (a non-finite streak stops the run), :meth:`epoch_record`, the
        learning-rate plateau on the first loss, the history; on the main process
        :meth:`write_epoch` (figures at most every few minutes, and at the end) and
        ``metrics.jsonl``; the checkpoint; ``on_epoch(record)``."""
        config = self.config
        numbers = self._checked(meter, config.steps_per_epoch - 1)
        self.counts = self._fresh_counts(numbers)
        means = {k: numbers[k] / numbers["n"] if numbers["n"] else float("nan") for k in self.losses}
        record = self.epoch_record(means, numbers["skipped"], time.perf_counter() - started)
        first = means[self.losses[0]]
        self.scheduler.step(first if math.isfinite(first) else float("inf"))
        self.history.append(record)
        self.epoch, self.step = self.epoch + 1, 0
        if self.d.main:
            now, ending = time.monotonic(), self.epoch >= config.epochs or not self.keep_going()
            draw = config.plots and (ending or now - self.last_drawn >= PLOT_EVERY_SECONDS)
            self.write_epoch(record, draw)
            atomic_write_text(self.run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
            self.last_drawn = now if draw else self.last_drawn
        self._save(StepMeter(self.d.device, self.losses, self.counts))
        if on_epoch:
            on_epoch(record)

    # ---- helpers -----------------------------------------------------------------------------

    def _resume_guard(self, config: RunSettings) -> RunSettings:
        if not self.checkpoint_path.exists():
            raise self.error("has no checkpoint to resume from", source=str(self.run))
        state = read_run_checkpoint(self.checkpoint_path, type(self))
        try:
            saved = type(config).model_validate_json(state["config"])
        except ValueError as exc:   # pydantic's ValidationError is one
            raise damaged(self.checkpoint_path, f"is damaged: its settings do not read ({str(exc)[:160]})",
                          CHECKPOINT_FIX) from None
        if config.spacing is None:   # not asked for: the run's own (resolved when it started)
            config = config.model_copy(update={"spacing": saved.spacing})
        check_resume_settings(saved, config, self.run, error=self.error)
        self.state = state
        return config

    def _fresh_counts(self, counters: dict[str, Any]) -> dict[str, float]:
        return {**dict.fromkeys(self.losses, 0.0), "n": 0, **{k: counters[k] for k in COUNTERS}}

    def _checked(self, meter: StepMeter, step: int) -> dict:
        return read_checked(meter, self.config.max_nonfinite, self.error, epoch=self.epoch, step=step,
                            checkpoint=self.checkpoint_path,
                            rate_option=self.rate_option)

    def _save(self, meter: StepMeter) -> None:
        """Checkpoint where the run stands (main process), unless a weight is not finite: a
        broken state never replaces the last good one."""
        self.counts = meter.state()
        if not self.d.main or not all(torch.isfinite(p).all() for p in self.guarded()):
            return
        save_checkpoint(self.checkpoint_path, {
            "format": self.checkpoint_format, "version": self.checkpoint_version,
            "config": self.config.model_dump_json(), "epoch": self.epoch, "step": self.step, "amp": self.amp,
            "torch_rng": torch.get_rng_state(), "history": self.history,
            "sums": {k: self.counts[k] for k in (*self.losses, "n")}, **{k: self.counts[k] for k in COUNTERS},
            **self.snapshot()})

    def _restore(self, state: dict[str, Any]) -> None:
        check_resume_precision(state.get("amp"), self.amp, self.run, error=self.error)
        try:   # a tensor of another shape or type, a missing or mistyped entry
            self.restore(state)
            torch.set_rng_state(state["torch_rng"])
            for optimiser in (v for v in vars(self).values() if isinstance(v, torch.optim.Optimizer)):
                check_optimiser_state(optimiser)
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise damaged(self.checkpoint_path, f"does not fit this run: {type(exc).__name__}: {str(exc)[:200]}",
                          CHECKPOINT_FIX) from None
        self.epoch, self.step, self.history = state["epoch"], state.get("step", 0), list(state["history"])
        older = state.get("counters", {})   # training checkpoints of scnas 0.4 kept two counters here
        self.counts = {**self._fresh_counts({k: state.get(k, older.get(k, 0)) for k in COUNTERS}),
                       **state.get("sums", {})}

    def parallel(self, net: torch.nn.Module, **options) -> torch.nn.Module:
        """``net`` wrapped in DistributedDataParallel under torchrun, else itself."""
        if self.d.world == 1:
            return net
        return torch.nn.parallel.DistributedDataParallel(
            net, gradient_as_bucket_view=True, device_ids=[self.d.device] if self.d.device.type == "cuda" else None,
            **options)

    # ---- hooks: what a kind of run fills in --------------------------------------------------

    def build_settings(self) -> dict[str, Any]:
        """Extra ``BuildConfig`` settings of this kind of run (e.g. deep supervision); called
        once by :meth:`initialize`, before :meth:`plan_step`. Default: none."""
        return {}

    def plan_step(self, available: int | None) -> MemoryPlan:
        """The memory plan of one step (checkpointing mode, micro-batch) for ``available``
        bytes (None: no budget, nothing to plan on the CPU); called once by :meth:`initialize`
        once ``self.build``, ``self.share`` and ``self.amp`` are known. Raises
        ``MemoryPlanError`` when nothing fits (the run then refuses to start)."""
        raise NotImplementedError

    def setup(self) -> None:
        """The kind's own state that needs the data (``self.cache``): its case splits, say;
        called at the end of :meth:`initialize`. Default: nothing."""

    def describe(self) -> dict[str, Any]:
        """What config.json says besides the settings, the network settings and the plan;
        called by :meth:`on_run_start` on the main process."""
        raise NotImplementedError

    def make(self) -> None:
        """Networks, optimisers (and ``self.scheduler``, a ``ReduceLROnPlateau`` stepped on the
        first loss), data loaders; called by :meth:`on_run_start` after seeding, before a
        resumed state is restored."""
        raise NotImplementedError

    def restore(self, state: dict[str, Any]) -> None:
        """Load what :meth:`snapshot` saved into what :meth:`make` made (on resume). Any
        mismatch raises (the checkpoint is then reported as not fitting this run)."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        """The checkpoint's state of this kind (networks, optimisers, scalers, own
        generators); called at every checkpoint, on the main process."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Anything to do once before the first step (e.g. compiling). Default: nothing."""

    def keep_going(self) -> bool:
        """Whether another epoch should run (e.g. the learning rate has not fallen below its
        floor); asked before every epoch and at each epoch's end (is this the last one?).
        Default: True (the epochs decide)."""
        return True

    def batches(self, epoch: int, start: int, stop: int) -> Iterable:
        """The batches of steps ``start`` .. ``stop - 1`` of ``epoch`` (``start`` > 0 when
        resuming inside an epoch); whatever :meth:`train_step` takes. Called at each epoch's start."""
        raise NotImplementedError

    def train_step(self, batch) -> tuple[Sequence[torch.Tensor], torch.Tensor, torch.Tensor]:
        """One step: its losses in the order of ``losses`` (device scalars), whether the step
        was skipped, and whether it counts towards the non-finite streak (device bools).
        Nothing is read back to the host here (see ``log_every_steps``)."""
        raise NotImplementedError

    def progress_text(self, numbers: dict) -> str:
        """The progress bar's text from the epoch's sums so far (``numbers[loss]``, ``n``)."""
        return f"loss {numbers[self.losses[0]] / max(numbers['n'], 1):.4f}"

    def epoch_record(self, means: dict[str, float], skipped: int, seconds: float) -> dict[str, Any]:
        """The epoch's line of ``metrics.jsonl`` (plain JSON data, with ``"epoch"``: the epoch
        just finished, counted from 1) from the mean of each loss, the skipped steps and the
        epoch's seconds; usually also a validation Dice (:func:`validation_dice`). Called at
        the end of every epoch on every process, before the plateau and the checkpoint."""
        raise NotImplementedError

    def write_epoch(self, record: dict[str, Any], draw: bool) -> None:
        """The epoch's files besides metrics.jsonl (genotypes, model files), on the main
        process after :meth:`epoch_record`; figures only when ``draw``. Default: none."""

    def guarded(self) -> list[torch.Tensor]:
        """The tensors that must be finite for a checkpoint to be written (a broken state
        never replaces the last good one)."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last epoch, on every process (not after a stop inside an epoch). Default: nothing."""

    def result(self):
        """What :meth:`execute` returns (``SearchResult``, ``TrainResult``): called at its end,
        after :meth:`finish` or at a stop inside an epoch."""
        raise NotImplementedError


@dataclass
class _Budget:
    """The steps and epochs one :meth:`RunLoop.execute` call may still run (None: no limit)."""

    steps: int | None
    epochs: int | None
    steps_done: int = 0
    epochs_done: int = 0

    def steps_spent(self) -> bool:
        return self.steps is not None and self.steps_done >= self.steps

    def spent(self) -> bool:
        return self.steps_spent() or (self.epochs is not None and self.epochs_done >= self.epochs)


def read_run_checkpoint(path: Path, kind: type[RunLoop]) -> dict[str, Any]:
    """A checkpoint of ``kind``'s format and version (tensors and plain data only:
    ``weights_only=True``), or ``kind.error`` saying why not."""
    state = read_checkpoint(path, kind.checkpoint_format, kind.error)
    if state.get("version") != kind.checkpoint_version:
        raise kind.error(f"is a version-{state.get('version')} checkpoint from an older scnas; {kind.outdated}",
                         source=str(path))
    check_shape(state, RunState, path, fix=CHECKPOINT_FIX, strict=True)
    return state


class RunState(BaseModel):
    """The fields of a checkpoint that :class:`RunLoop` itself reads (a kind's own state is
    checked by loading it)."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    config: str
    epoch: int = Field(ge=0)
    step: int = Field(0, ge=0)
    amp: str | None = None
    torch_rng: torch.Tensor
    history: list[dict[str, Any]]
    sums: dict[str, float] = {}


def check_optimiser_state(optimiser: torch.optim.Optimizer) -> None:
    """Refuse optimiser state (Adam's moments) whose tensors do not have their parameter's
    shape: ``load_state_dict`` accepts them, and the first step would fail."""
    for parameter, state in optimiser.state.items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != parameter.shape:
                raise ValueError(f"optimiser state {name!r} of shape {tuple(value.shape)} for a parameter of shape "
                                 f"{tuple(parameter.shape)}")


@torch.no_grad()
def validation_dice(logits_of: Callable[[torch.Tensor], torch.Tensor], data, batch_size: int, *, num_classes: int,
                    device: torch.device, precision: Precision) -> float:
    """Mean foreground Dice over the fixed patches of ``data`` (nnU-Net's "pseudo Dice": the
    patches pooled, each class's Dice, the mean of those present).

    Args:
        logits_of: the network's forward pass (eval mode).
        data: the fixed validation patches (image, label) pairs.
        batch_size: patches per forward pass.
        num_classes: K, including background.
        device: where the network runs.
        precision: the autocast to run in.
    """
    predictions, targets = [], []
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        x = torch.stack([item[0] for item in items]).to(device)
        with precision.autocast():
            predictions.append(logits_of(x).argmax(1).cpu())
        targets.append(torch.stack([item[1] for item in items]))
    scores = [s for s in dice_per_class(torch.cat(predictions), torch.cat(targets), num_classes) if not math.isnan(s)]
    return float(np.mean(scores)) if scores else float("nan")


def open_or_prepare(data: str, spacing, processes: Processes, *, say=lambda line: None, poll_seconds: float = 5.0,
                    start_timeout: float = 600.0):
    """``data`` as a prepared cache: a cache folder itself, or a task folder that the main
    process prepares into its shared cache (``scnas.data.cache.shared_cache_folder``) with
    one worker per usable core, alone or under torchrun. The other processes wait by
    watching the file system rather than at a collective, which would time out (after 30
    minutes by default) on a task the size of BraTS.

    Args:
        data: a prepared cache folder or a task folder.
        spacing: the target spacing for a task folder (None: 0.7 mm).
        processes: this process's place under torchrun.
        say: prints notices (main process).
        poll_seconds: how often the other processes look for the finished cache.
        start_timeout: how long they wait for the main process to start preparing.
    """
    import time as _time

    from scnas.data.cache import DEFAULT_SPACING, Cache, open_or_prepare as _open, shared_cache_folder
    from scnas.data.preprocess import PrepareSettings

    if processes.world == 1 or processes.main or (Path(data) / "cache.json").exists():
        cache = _open(data, spacing, prepare=processes.main, workers="auto", say=say if processes.main else
                      (lambda line: None))
    else:
        # prepare_dataset writes settings.json before the first case: if it never appears, rank 0
        # writes to a file system this process does not see (several machines, local disks).
        prepared = shared_cache_folder(data, PrepareSettings(target_spacing=spacing or DEFAULT_SPACING))
        started, marker, begun = _time.monotonic(), prepared / "cache.json", prepared / "settings.json"
        while not marker.exists():
            if not begun.exists() and _time.monotonic() - started > start_timeout:
                raise ScnasError(f"rank {processes.rank} waited {start_timeout:.0f} s for rank 0 to start preparing "
                                 f"{data} into {prepared} and saw nothing: on several machines without a shared file "
                                 "system, run 'scnas data prepare' first and pass the cache folder as --data (or "
                                 "set SCNAS_CACHE to a shared folder)", source=str(prepared))
            _time.sleep(poll_seconds)
        cache = None
    processes.barrier()   # every process past preparation (a failing main process ends the torchrun job)
    return cache if cache is not None else Cache(prepared)
