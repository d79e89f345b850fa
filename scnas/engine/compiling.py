"""``--compile``: ``torch.compile`` for prediction and training, timed, with eager as the fallback.

Compilation happens on the first call (dynamo traces, inductor generates kernels: about a
minute for a stem-68 network on a GPU, much longer for a training step) and pays back only
over many calls of the same shapes; a failure (no C compiler, an unsupported operation) is
reported in one line and the network runs uncompiled. Compiled arithmetic may differ from
eager by float rounding (fused kernels reassociate sums).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def compiled_for_inference(model: nn.Module, say: Callable[[str], None]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(model)`` as a function, timed on its first batch (printed through ``say``);
    eager, with a notice, where compiling fails."""
    state = {"network": torch.compile(model), "settled": False}

    def run(batch: torch.Tensor) -> torch.Tensor:
        if state["settled"]:
            return state["network"](batch)
        started = time.perf_counter()
        try:
            out = state["network"](batch)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly instead
            say(f"note: --compile failed ({_first_line(exc)}); running uncompiled")
            state["network"], state["settled"] = model, True
            return model(batch)
        state["settled"] = True
        say(f"compiled the network in {time.perf_counter() - started:.1f} s (first batch included)")
        return out

    return run


def compile_for_training(net: nn.Module, example: torch.Tensor, autocast, *, say: Callable[[str], None]) -> bool:
    """Compile ``net`` in place (``nn.Module.compile``: parameter names, state dicts and model
    files stay as they are) and compile forward and backward now, on ``example`` (one
    micro-batch, under ``autocast``), so that the time is printed and a failure falls back to
    eager before the first step. Leaves no gradients behind; returns whether it compiled.

    Args:
        net: the network, compiled in place.
        example: one micro-batch of input.
        autocast: the context manager of the run's precision.
        say: prints the compile time, or why it fell back to eager.
    """
    net.compile()
    started = time.perf_counter()
    try:
        with autocast():
            out = net(example)
        (out[0] if isinstance(out, (list, tuple)) else out).float().mean().backward()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any compiler failure: train eagerly instead
        net._compiled_call_impl = None   # what nn.Module.compile set: back to the eager call
        say(f"note: --compile failed ({_first_line(exc)}); training uncompiled")
        return False
    finally:
        net.zero_grad(set_to_none=True)
    say(f"compiled the network's forward and backward in {time.perf_counter() - started:.1f} s")
    return True
