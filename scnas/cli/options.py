"""Options that several commands share, declared once."""

from __future__ import annotations

from typing import Optional

import typer

from scnas import defaults as D
from scnas.errors import ScnasError, check_choice


class Choice:
    """Parses an option restricted to ``choices``, one of :mod:`scnas.defaults`' tuples (the
    very object the library checks against): another value is refused as one line, "--amp must
    be auto, off, fp16 or bf16, not 'fp8'", exit 1, before the command runs."""

    def __init__(self, flag: str, choices: tuple[str, ...]):
        self.flag, self.choices = flag, choices

    def __call__(self, value: str) -> str:
        return check_choice(value, self.choices, self.flag, error=ScnasError)


def choice(default: str | None, flag: str, choices: tuple[str, ...], *, help: str, **extra) -> str:
    """A typer option that accepts one of ``choices`` (shown as ``[a|b|c]`` in --help).

    Args:
        default: the default value (None: not given).
        flag: the option's name, e.g. ``--amp``.
        choices: the tuple of :mod:`scnas.defaults` the value must be one of.
        help: the option's help text.
        extra: more of typer.Option's arguments (rich_help_panel).
    """
    return typer.Option(default, flag, parser=Choice(flag, choices), metavar=f"[{'|'.join(choices)}]", help=help,
                        **extra)


MICRO_BATCH: Optional[int] = typer.Option(
    None, "--micro-batch", min=1, help="Patches per forward pass; gradients accumulate exactly over a process's share "
                                       "(default: the largest that fits). With --resume: may change.")
CHECKPOINT: Optional[str] = choice(
    None, "--checkpoint", D.CHECKPOINT_CHOICES, help="Activation checkpointing: off, cells, edges (least memory, most recomputation), or "
                               "auto: the cheapest that fits the GPU [default: auto].")
GPU_MEMORY: Optional[str] = typer.Option(
    None, "--gpu-memory", help="Memory to plan for, e.g. 24GiB (default: the CUDA device's free memory). A setting "
                               "that cannot fit is refused before the first step.")
AMP: str = choice(D.AMP, "--amp", D.AMP_CHOICES, help="Mixed precision: fp16 (with gradient scaling), bf16 or off; auto: fp16 "
                                              "on CUDA, off on CPU.")
COMPILE: bool = typer.Option(False, "--compile", help="torch.compile the network: the first step pays the compilation "
                                                    "(printed, about a minute at stem 68), later ones run faster on a GPU. "
                                                    "Pays for long runs; on the CPU rarely. Falls back to eager, with a "
                                                    "notice, where compilation fails.")

LOSS: str = choice(D.LOSS, "--loss", D.LOSS_CHOICES, help="jaccard: soft Jaccard distance averaged over all classes, "
                                                    "background included (the paper's loss as scnas reads it); "
                                                    "jaccard-fg: over the foreground classes only (nnU-Net leaves "
                                                    "background out of its Dice loss).")

DEVICE: str = choice(D.DEVICE, "--device", D.DEVICE_CHOICES, help="auto (CUDA when available), cpu or cuda.")
UPSAMPLING: str = choice(D.UPSAMPLING, "--upsampling", D.UPSAMPLING_CHOICES, help="trilinear (interpolation, then a "
                         "1x1x1 convolution) or transposed (a transposed convolution).")

DEEP_SUPERVISION: bool = typer.Option(
    D.DEEP_SUPERVISION, "--deep-supervision", help="Also train 1x1x1 heads on the coarser decoder levels (nnU-Net's "
                                                   "deep supervision: weighted loss 1/2^i over the outputs, the "
                                                   "coarsest 0). Inference uses the main output only; model files "
                                                   "load with or without the heads.")



def in_channels_option(when: str = "") -> int:
    """``--in-channels``, as build, export-onnx and draw take it (``when``: e.g. "For a genotype: ")."""
    return typer.Option(D.IN_CHANNELS, "--in-channels", min=1,
                        help=_prefixed(when, "input channels (BraTS: 4 MRI sequences; CT: 1)."))


def classes_option(when: str = "") -> int:
    """``--classes``: classes including background wherever scnas takes it (``data phantom`` too)."""
    return typer.Option(D.NUM_CLASSES, "--classes", min=1,
                        help=_prefixed(when, "classes including background, the network's output channels (MONAI's "
                                             "out_channels, nnU-Net's number of labels; BraTS: 4)."))


def _prefixed(when: str, text: str) -> str:
    return when + text if when else text[0].upper() + text[1:]


def vocabulary(text: str | None, flag: str = "--ops") -> list[str] | None:
    """A comma-separated op vocabulary as a list (None when not given); an unknown or repeated
    name, or fewer than two, is refused naming the known ops."""
    from scnas.errors import ScnasError
    from scnas.genotype.ops import OPS, known_ops_text

    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise ScnasError(f"{flag}: unknown op{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known ops: {known_ops_text()}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ScnasError(f"{flag}: {', '.join(repeated)} listed twice")
    if len(names) < 2:
        raise ScnasError(f"{flag}: a search chooses between at least two ops; got {len(names)}")
    return names


def fitting_overrides(checkpoint: Optional[str], micro_batch: Optional[int], gpu_memory: Optional[str]) -> dict:
    """The settings that fit a step into memory, as given on the command line (also on --resume)."""
    given = {"checkpoint": checkpoint, "micro_batch": micro_batch, "gpu_memory": gpu_memory}
    return {key: value for key, value in given.items() if value is not None}


def given_on_command_line(ctx, name: str) -> bool:
    """Whether the user gave the parameter ``name`` (on the command line or through the
    environment), rather than leaving its default."""
    source = ctx.get_parameter_source(name)   # an enum of typer's own click; compared by name
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def flag_name(ctx, name: str) -> str:
    """The longest spelling of parameter ``name``'s flag (``--steps-per-epoch`` for ``steps``)."""
    for param in ctx.command.params:
        if param.name == name:
            return max(param.opts, key=len) if param.opts else name
    return name


def resume_settings(ctx, values: dict, renamed: dict[str, str], *, saved: dict, make_config, run, error):
    """The settings of a resumed run: the run's own (``saved``) with those the user gave that
    may change on resume (``scnas.engine.checkpoints.RESUMABLE_CHANGES``). ``values`` are the command's
    settings by key, ``renamed`` maps a key to its parameter's name where they differ. A
    setting given explicitly with a value other than the run's is refused, naming it, the
    run's value and the one given (silently ignoring it would resume something else than
    asked).

    Args:
        ctx: the command's typer context (which parameters the user gave).
        values: the command's settings by key.
        renamed: a key's parameter name where they differ.
        saved: the run's own settings (from its checkpoint).
        make_config: builds the settings model from a dict.
        run: the run folder, named in the error.
        error: the error to raise.
    """
    from scnas.engine.checkpoints import RESUMABLE_CHANGES

    given = {key: value for key, value in values.items() if given_on_command_line(ctx, renamed.get(key, key))}
    original = make_config(saved)
    resumed = make_config({**saved, **given})
    old, new = original.model_dump(mode="json"), resumed.model_dump(mode="json")
    names = {param.name for param in ctx.command.params}
    differing = [f"{flag_name(ctx, renamed.get(key, key))} {shown(new[key])} (the run's: {shown(old[key])})"
                 for key in given if key not in RESUMABLE_CHANGES and new[key] != old[key]]
    if differing:
        raise error(f"--resume continues the run with its own settings, but {'; '.join(differing)} "
                    f"differ{'s' if len(differing) == 1 else ''}: leave {'it' if len(differing) == 1 else 'them'} out "
                    f"to resume, or start a new run in another folder (only "
                    f"{', '.join(flag_name(ctx, k) for k in RESUMABLE_CHANGES if k in names)} may change)", source=str(run))
    return resumed


def shown(value) -> str:
    """A setting's value as it is typed on the command line."""
    if isinstance(value, list):
        return " ".join(map(str, value)) if all(not isinstance(v, str) for v in value) else ",".join(map(str, value))
    return str(value)

MAX_FREE = typer.Option(None, "--max-free", min=0, metavar="K",
                        help="Countermeasure (P-DARTS, DARTS+): at most K parameter-free ops (identity, pooling) per "
                             "derived cell; the weakest others get their edge's best op with weights.")

