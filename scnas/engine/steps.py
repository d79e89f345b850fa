"""One optimiser step as search and training take it: mixed precision, micro-batches with
gradient accumulation, the exact loss of the whole (global) batch, a non-finite guard that
never waits on the GPU, and loss bookkeeping read back only every few steps.

The loss (soft Jaccard) sums over the whole batch before it divides, so it does not split
into a sum of per-patch losses: micro-batches and processes cannot simply add their
gradients. :func:`accumulate_exact` first gathers the loss's sums over every micro-batch
and process, then backpropagates each micro-batch through the linearisation of the loss at
those totals, which gives the gradient of the whole batch's loss exactly (up to rounding;
the networks have no batch statistics). With one micro-batch per process it costs nothing
extra; with more, one forward pass without gradients per further micro-batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from scnas.defaults import AMP_CHOICES  # noqa: F401  (re-exported: the choices of resolve_amp)
from scnas.metrics import supervised_from_statistics, supervised_statistics
from scnas.errors import ScnasError

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto``: fp16 on CUDA (faster than bf16 for cuDNN's 3D convolutions: docs/memory.md),
    off on the CPU."""
    if amp == "auto":
        return "fp16" if device.type == "cuda" else "off"
    return amp


class Precision:
    """Autocast and, for fp16, a gradient scaler (one per optimiser: search has two)."""

    def __init__(self, amp: str, device: torch.device):
        self.amp = resolve_amp(amp, device)
        self.device = device
        self.dtype = _DTYPES.get(self.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def load_scaler(self, state: dict | None) -> None:
        """Restore the gradient scaler from a checkpoint (a disabled scaler saved an empty state)."""
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def gradients(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Gradients of ``loss`` for ``inputs`` only (scaled like ``backward``'s)."""
        return torch.autograd.grad(self.scaler.scale(loss), list(inputs))


def split_batch(x: torch.Tensor, y: torch.Tensor, micro_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) in micro-batches of at most ``micro_batch`` patches, as equal as possible."""
    count = -(-x.shape[0] // micro_batch)
    return list(zip(x.tensor_split(count), y.tensor_split(count)))


def accumulate_exact(logits_of: Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor]],
                     batches: list[tuple[torch.Tensor, torch.Tensor]], backward: Callable[[torch.Tensor], None],
                     *, precision: Precision, world: int = 1, no_sync: Callable[[], object] | None = None,
                     foreground_only: bool = False, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Backpropagate the soft Jaccard loss of all ``batches`` of all ``world`` processes and
    return that loss (a device scalar, no host synchronisation); ``foreground_only``: the
    loss leaves the background class out (``--loss jaccard-fg``).

    ``weights`` (deep supervision): ``logits_of`` returns [main, coarser heads...] and the
    loss is the weighted sum of each output's loss against the labels downsampled to its
    shape (:func:`scnas.metrics.supervised_loss`); None: one output of weight 1, which is the
    plain loss exactly (one code path for both).

    ``backward(surrogate)`` backpropagates one micro-batch's share (scaled by the caller's
    scaler); ``no_sync`` (DistributedDataParallel's) keeps gradients local for every
    micro-batch but the last, whose backward reduces them over the processes.

    Args:
        logits_of: the network's forward pass (a list of outputs with deep supervision).
        batches: this process's micro-batches (images, labels).
        backward: backpropagates a surrogate loss (e.g. through a gradient scaler).
        precision: the autocast to run the forward passes in.
        world: processes sharing the batch (their loss sums are all-reduced).
        no_sync: DistributedDataParallel's ``no_sync``, to reduce gradients once per step.
        foreground_only: leave the background class out of the loss.
        weights: deep supervision's weights of the outputs (None: one output).
    """
    weights = [1.0] if weights is None else weights   # one output of weight 1: exactly the plain loss
    quiet = no_sync if (no_sync is not None and len(batches) > 1) else nullcontext
    rest = []
    with torch.no_grad(), precision.autocast():
        for x, y in batches[1:]:
            rest.append(supervised_statistics(logits_of(x), y))
    with quiet():
        with precision.autocast():
            first = supervised_statistics(logits_of(batches[0][0]), batches[0][1])
        total = first.detach() + sum(rest) if rest else first.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        point = total.requires_grad_(True)
        loss = supervised_from_statistics(point, weights, foreground_only=foreground_only)
        (slope,) = torch.autograd.grad(loss, point)
        # DistributedDataParallel averages gradients over processes: multiply by the world
        # so that the average is the gradient of the global batch's loss.
        slope = slope * world
        backward((first * slope).sum())
    for index, (x, y) in enumerate(batches[1:], start=1):
        context = quiet() if index < len(batches) - 1 else nullcontext()
        with context:
            with precision.autocast():
                statistics = supervised_statistics(logits_of(x), y)
            backward((statistics * slope).sum())
    return loss.detach()


def gradient_norm(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients (a device scalar; 0 when there are none)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def guarded_step(optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor], precision: Precision,
                 *, loss: torch.Tensor, max_norm: float | None = None) -> torch.Tensor:
    """Unscale, clip (``max_norm``), and step unless the loss or a gradient is not finite.
    Returns a device bool: True when the step was skipped. With a fused optimiser the
    decision stays on the device (no synchronisation); otherwise it is read back.

    Args:
        optimizer: the optimiser to step.
        parameters: its parameters (clipped together).
        precision: the run's precision (its gradient scaler).
        loss: the step's loss (device scalar).
        max_norm: the gradient norm to clip to (None: no clipping).
    """
    precision.scaler.unscale_(optimizer)
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    else:
        norm = gradient_norm(parameters)
    skipped = ~(torch.isfinite(norm) & torch.isfinite(loss)).reshape(())
    if precision.scaler.is_enabled():
        precision.scaler.step(optimizer)   # skips by itself on non-finite gradients
        precision.scaler.update()
    elif getattr(optimizer, "defaults", {}).get("fused"):
        optimizer.grad_scale = None        # type: ignore[attr-defined]
        optimizer.found_inf = skipped.float().to(norm.device)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    elif not bool(skipped):
        optimizer.step()
    return skipped


def fused_if_available(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for Adam: the fused kernel (one launch, skips on the device) where
    this torch has it for the device."""
    try:
        torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return {}
    return {"fused": True}


SCALER_SKIP_LIMIT = 32
"""Steps in a row a run may skip for non-finite gradients while its loss is finite: the fp16
gradient scaler halves its scale at each, and finds a working one within ~16 from 65536."""


class StepMeter:
    """Per-step bookkeeping kept on the device and read back every few steps: sums of the
    finite losses, skipped steps, the current and longest run of steps whose loss (or, without
    a scaler, whose gradients) were not finite (``streak``), and of skipped steps (``skips``)."""

    def __init__(self, device: torch.device, names: Sequence[str], state: dict | None = None):
        self.device, self.names = device, list(names)
        state = state or {}

        def number(key: str) -> torch.Tensor:
            return torch.tensor(float(state.get(key, 0)), dtype=torch.float64, device=device)

        self.sums = torch.tensor([float(state.get(n, 0.0)) for n in self.names], dtype=torch.float64, device=device)
        self.count, self.skipped = number("n"), number("skipped")
        self.streak, self.skips = number("streak"), number("skips")
        self.longest, self.longest_skips = self.streak.clone(), self.skips.clone()

    def record(self, losses: Sequence[torch.Tensor], skipped: torch.Tensor, failed: torch.Tensor) -> None:
        """``skipped``: some optimiser step was skipped; ``failed``: the step counts towards
        the non-finite streak (a bad loss, or bad gradients without a scaler)."""
        ok = ~skipped
        values = torch.stack([loss.detach().double().reshape(()) for loss in losses])
        self.sums += torch.where(ok, values, torch.zeros_like(values))
        self.count += ok.double()
        self.skipped += skipped.double()
        self.streak = (self.streak + 1) * failed.double()
        self.skips = (self.skips + 1) * skipped.double()
        self.longest = torch.maximum(self.longest, self.streak)
        self.longest_skips = torch.maximum(self.longest_skips, self.skips)

    def read(self) -> dict:
        """Everything as host numbers (one synchronisation)."""
        extra = ("n", "skipped", "streak", "skips", "longest", "longest_skips")
        counters = torch.stack([self.count, self.skipped, self.streak, self.skips, self.longest, self.longest_skips])
        values = torch.cat([self.sums, counters]).cpu().tolist()
        result = dict(zip(self.names, values[: len(self.names)]))
        result.update({key: int(value) for key, value in zip(extra, values[len(self.names):])})
        return result

    def state(self) -> dict:
        """What a checkpoint keeps to continue the counts (reads the device back)."""
        numbers = self.read()
        return {key: numbers[key] for key in (*self.names, "n", "skipped", "streak", "skips")}


def read_checked(meter: StepMeter, limit: int, error: type[ScnasError], *, epoch: int, step: int, checkpoint: Path,
                 rate_option: str) -> dict:
    """``meter.read()``, or ``error`` when ``limit`` steps in a row had non-finite losses or
    gradients (the last good checkpoint stays as it is).

    Args:
        meter: the epoch's loss meter.
        limit: non-finite steps in a row that stop the run.
        error: the error to raise.
        epoch: the epoch, named in the error.
        step: the step, named in the error.
        checkpoint: the last good checkpoint, named in the error.
        rate_option: the option to lower, suggested in the error.
    """
    numbers = meter.read()
    if numbers["longest"] >= limit:
        raise error(f"{numbers['longest']} non-finite losses or gradients in a row by epoch {epoch + 1}, step "
                    f"{step + 1}; stopped. The last good checkpoint ({checkpoint.name}) is kept: lower {rate_option} "
                    "or check the data", source=str(checkpoint.parent))
    if numbers["longest_skips"] >= SCALER_SKIP_LIMIT:
        raise error(f"{numbers['longest_skips']} steps in a row skipped for non-finite gradients by epoch {epoch + 1}, "
                    f"step {step + 1}, though the loss was finite: the fp16 gradient scaler found no scale that works; "
                    f"stopped. The last good checkpoint ({checkpoint.name}) is kept: try --amp bf16 or off, or lower "
                    f"{rate_option}", source=str(checkpoint.parent))
    return numbers


def out_of_memory(error: type[ScnasError], epoch: int, plan_text: str, *, checkpoint: Path,
                  plan_command: str) -> ScnasError:
    """The error for a step that ran out of device memory despite the plan.

    Args:
        error: the error to build.
        epoch: the epoch, named in the message.
        plan_text: the memory plan, described.
        checkpoint: the last checkpoint, to resume from.
        plan_command: the command that shows what fits.
    """
    return error(f"ran out of device memory at epoch {epoch + 1} ({plan_text}). The last checkpoint ({checkpoint.name}) "
                 "is kept: --resume with --checkpoint edges or a smaller --micro-batch (or --gpu-memory below this "
                 f"device's, so that the plan leaves more room); '{plan_command}' shows what fits",
                 source=str(checkpoint.parent))
