"""The ``scnas`` typer app, its consoles and its root options; the command modules add their
commands to :data:`app` (``scnas.cli.main`` imports them and runs it)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from scnas import __version__
from scnas.errors import ScnasError

app = typer.Typer(
    name="scnas",
    help="Neural architecture search for 3D medical image segmentation (SCNAS, MICCAI 2019), "
         "built around a versioned genotype format.\n\n"
         "A GENOTYPE argument is a .yaml/.json/.darts/.oneline file, '-' for stdin, or a built-in "
         "name (see 'scnas genotype list').",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def settings_error(exc, error: type[ScnasError]) -> ScnasError:
    """A pydantic ValidationError of command settings as one ScnasError line per field."""
    return error("; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()))


def _version(value: bool) -> None:
    if value:
        stdout.print(f"scnas {__version__}")
        raise typer.Exit(0)


COMPUTING = {"search", "train", "predict", "cv", "export-onnx"}   # where threads matter enough to say (demo: one)
GENOTYPE_ONLY = {"validate", "show", "diff", "convert", "schema", "genotype"}   # never import torch


@app.callback()
def _root(
    context: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback when something fails."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    threads: Optional[int] = typer.Option(
        None, "--threads", envvar="SCNAS_THREADS", min=1, metavar="N",
        help="CPU threads for torch in this process. Default: OMP_NUM_THREADS if set, else the usable cores less "
             "the load of other processes (a core taken by another job stalls all of torch's threads; "
             "loader workers use one each)."),
) -> None:
    """Root options; the commands do the work."""
    if (context.obj or {}).get("help") or context.invoked_subcommand in GENOTYPE_ONLY:
        return   # help prints text only, genotype commands run without torch: no threads to choose, no notice
    from scnas.threads import apply_threads

    chosen, why = apply_threads(threads)
    if "load" in why and context.invoked_subcommand in COMPUTING:   # fewer threads because of other jobs
        stderr.out(f"using {chosen} torch thread(s) ({why}); --threads N to choose")
